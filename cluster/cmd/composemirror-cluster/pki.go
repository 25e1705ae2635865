package main

// pki writes the cluster's certificates, service-account keys and component kubeconfigs into one
// directory. Files that exist are kept, so a restart keeps its identities; a fresh directory gets
// a fresh CA. It only writes files: it starts nothing and talks to no server.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type pkiOptions struct {
	dir       string
	nodeName  string
	nodeIP    string
	serviceIP string
	server    string
}

// identity is one client certificate and the kubeconfig that carries it.
type identity struct {
	file string // kubeconfig file name
	cn   string
	org  []string
}

func runPKI(args []string) int {
	var o pkiOptions
	fs := flag.NewFlagSet("pki", flag.ContinueOnError)
	fs.StringVar(&o.dir, "dir", "", "directory for certificates, keys and kubeconfigs")
	fs.StringVar(&o.nodeName, "node-name", "", "the node's name")
	fs.StringVar(&o.nodeIP, "node-ip", "", "the node's address (API server and kubelet serve on it)")
	fs.StringVar(&o.serviceIP, "service-ip", "", "the kubernetes Service's cluster IP")
	fs.StringVar(&o.server, "server", "https://127.0.0.1:6443", "API server URL written into kubeconfigs")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.dir == "" || o.nodeName == "" || o.nodeIP == "" || o.serviceIP == "" {
		fmt.Fprintln(os.Stderr, "pki: --dir, --node-name, --node-ip and --service-ip are required")
		return 2
	}
	if err := writePKI(o); err != nil {
		fmt.Fprintln(os.Stderr, "pki:", err)
		return 1
	}
	return 0
}

func writePKI(o pkiOptions) error {
	if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return err
	}
	ca, caKey, err := loadOrCreateCA(o.dir, "ca", "composemirror-cluster-ca")
	if err != nil {
		return err
	}
	// The front proxy's own CA: the API server trusts requests it forwards to aggregated API
	// servers, and they verify it, only through this one.
	proxyCA, proxyCAKey, err := loadOrCreateCA(o.dir, "front-proxy-ca", "composemirror-front-proxy-ca")
	if err != nil {
		return err
	}
	if err := writeLeaf(o.dir, "front-proxy-client", proxyCA, proxyCAKey,
		pkix.Name{CommonName: "front-proxy-client"}, x509.ExtKeyUsageClientAuth, nil, nil); err != nil {
		return err
	}
	nodeIP := net.ParseIP(o.nodeIP)
	serviceIP := net.ParseIP(o.serviceIP)
	if nodeIP == nil || serviceIP == nil {
		return fmt.Errorf("bad address: node %q, service %q", o.nodeIP, o.serviceIP)
	}
	hostname, _ := os.Hostname()
	serving := []struct {
		name string
		cn   string
		dns  []string
		ips  []net.IP
	}{
		{"apiserver", "kube-apiserver",
			[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local", o.nodeName, hostname},
			[]net.IP{net.IPv4(127, 0, 0, 1), nodeIP, serviceIP}},
		{"kubelet", "system:node:" + o.nodeName, []string{"localhost", o.nodeName, hostname},
			[]net.IP{net.IPv4(127, 0, 0, 1), nodeIP}},
	}
	for _, s := range serving {
		if err := writeLeaf(o.dir, s.name, ca, caKey, pkix.Name{CommonName: s.cn},
			x509.ExtKeyUsageServerAuth, s.dns, s.ips); err != nil {
			return err
		}
	}
	// The API server's identity towards the kubelet (logs, exec, port-forward).
	if err := writeLeaf(o.dir, "apiserver-kubelet-client", ca, caKey,
		pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		x509.ExtKeyUsageClientAuth, nil, nil); err != nil {
		return err
	}
	if err := writeServiceAccountKey(o.dir); err != nil {
		return err
	}
	identities := []identity{
		{"admin.kubeconfig", "kubernetes-admin", []string{"system:masters"}},
		{"controller-manager.kubeconfig", "system:kube-controller-manager", nil},
		{"scheduler.kubeconfig", "system:kube-scheduler", nil},
		{"kubelet.kubeconfig", "system:node:" + o.nodeName, []string{"system:nodes"}},
		{"kube-proxy.kubeconfig", "system:kube-proxy", nil},
		{"coredns.kubeconfig", "system:coredns", nil},
	}
	for _, id := range identities {
		if err := writeKubeconfig(o.dir, id, o.server, ca, caKey); err != nil {
			return err
		}
	}
	return nil
}

func loadOrCreateCA(dir, name, cn string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPath, keyPath := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if certPEM, err := os.ReadFile(certPath); err == nil {
		keyPEM, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, nil, err
		}
		return parsePair(certPEM, keyPEM)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if err := writePEM(keyPath, "EC PRIVATE KEY", mustMarshalEC(key)); err != nil {
		return nil, nil, err
	}
	return cert, key, writePEM(certPath, "CERTIFICATE", der)
}

func parsePair(certPEM, keyPEM []byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, errors.New("CA files are not PEM")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	return cert, key, err
}

// issue signs a new key's certificate with the CA and returns both, PEM encoded.
func issue(ca *x509.Certificate, caKey *ecdsa.PrivateKey, subject pkix.Name, usage x509.ExtKeyUsage,
	dns []string, ips []net.IP) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subject,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: mustMarshalEC(key)})
	return certPEM, keyPEM, nil
}

func writeLeaf(dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, subject pkix.Name,
	usage x509.ExtKeyUsage, dns []string, ips []net.IP) error {
	certPath, keyPath := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if exists(certPath) && exists(keyPath) {
		return nil
	}
	certPEM, keyPEM, err := issue(ca, caKey, subject, usage, dns, ips)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	return os.WriteFile(certPath, certPEM, 0o644)
}

// writeServiceAccountKey writes the key that signs service-account tokens (sa.key) and its
// public half (sa.pub), which the API server verifies them with.
func writeServiceAccountKey(dir string) error {
	keyPath, pubPath := filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if exists(keyPath) && exists(pubPath) {
		return nil
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := writePEM(keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key)); err != nil {
		return err
	}
	return writePEM(pubPath, "PUBLIC KEY", pub)
}

func writeKubeconfig(dir string, id identity, server string, ca *x509.Certificate, caKey *ecdsa.PrivateKey) error {
	path := filepath.Join(dir, id.file)
	if exists(path) {
		return nil
	}
	certPEM, keyPEM, err := issue(ca, caKey, pkix.Name{CommonName: id.cn, Organization: id.org},
		x509.ExtKeyUsageClientAuth, nil, nil)
	if err != nil {
		return err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})
	b64 := base64.StdEncoding.EncodeToString
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: composemirror
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: composemirror
  context:
    cluster: composemirror
    user: %s
    namespace: default
current-context: composemirror
`, server, b64(caPEM), id.cn, b64(certPEM), b64(keyPEM), id.cn)
	return os.WriteFile(path, []byte(config), 0o600)
}

func writePEM(path, kind string, der []byte) error {
	mode := os.FileMode(0o644)
	if kind != "CERTIFICATE" && kind != "PUBLIC KEY" {
		mode = 0o600
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}

func mustMarshalEC(key *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		panic(err) // only fails for curves Go does not know
	}
	return der
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
