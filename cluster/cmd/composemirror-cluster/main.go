// Command composemirror-cluster runs the unchanged upstream components of a single-node
// Kubernetes cluster, one component per process: the first argument (or the name the binary is
// called by, for a symlink such as kubectl) picks the component, the rest are its own flags.
// It must not change what a component does; only pki, dns-query and image-archive are this
// project's own code.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones, as the upstream apiserver and controller-manager have

	"github.com/coredns/coredns/coremain"
	"go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl's client auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// components maps a subcommand to the upstream main it runs. Each returns the exit code.
var components = map[string]func() int{
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kubelet":                 func() int { return cli.Run(kubelet.NewKubeletCommand(context.Background())) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kubectl":                 runKubectl,
	"etcd":                    func() int { etcdmain.Main(os.Args); return 0 },
	"coredns":                 func() int { coremain.Run(); return 0 },
	"pki":                     func() int { return runPKI(os.Args[1:]) },
	"dns-query":               func() int { return runDNSQuery(os.Args[1:]) },
	"image-archive":           func() int { return runImageArchive(os.Args[1:]) },
}

// runKubectl is cmd/kubectl/kubectl.go's main.
func runKubectl() int {
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
	return 0
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := components[name]; !ok {
		if len(os.Args) < 2 || components[os.Args[1]] == nil {
			usage()
			os.Exit(2)
		}
		name = os.Args[1]
		// Each upstream main reads os.Args as if it were its own binary.
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	if name != "coredns" {
		dropGoFlags(coreDNSFlags)
	}
	os.Exit(components[name]())
}

// coreDNSFlags are the Go flags CoreDNS's coremain registers on flag.CommandLine at init.
// kube-proxy adds every Go flag to its own flags (for cadvisor's --boot-id-file), so without
// this it would take CoreDNS's -version for its own --version.
var coreDNSFlags = map[string]bool{
	"conf": true, "plugins": true, "pidfile": true, "version": true, "quiet": true,
	"dns.port": true, "p": true,
}

// dropGoFlags rebuilds flag.CommandLine without the named flags; the others keep their values.
func dropGoFlags(names map[string]bool) {
	kept := flag.NewFlagSet(flag.CommandLine.Name(), flag.ExitOnError)
	flag.CommandLine.VisitAll(func(f *flag.Flag) {
		if !names[f.Name] {
			kept.Var(f.Value, f.Name, f.Usage)
		}
	})
	flag.CommandLine = kept
}

func usage() {
	names := make([]string, 0, len(components))
	for n := range components {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: composemirror-cluster COMPONENT [FLAGS...]\ncomponents: %v\n", names)
}
