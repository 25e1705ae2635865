package main

// dns-query asks one DNS server one question and prints the answer's rcode and records, so the
// start script can wait until the cluster DNS really answers. It is a client only.

import (
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/miekg/dns"
)

func runDNSQuery(args []string) int {
	fs := flag.NewFlagSet("dns-query", flag.ContinueOnError)
	server := fs.String("server", "", "address of the DNS server (IP or IP:port)")
	qtype := fs.String("type", "A", "question type")
	timeout := fs.Duration("timeout", 2*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 || *server == "" {
		fmt.Fprintln(os.Stderr, "usage: dns-query --server ADDR [--type A] NAME")
		return 2
	}
	addr := *server
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "53")
	}
	t, ok := dns.StringToType[*qtype]
	if !ok {
		fmt.Fprintf(os.Stderr, "dns-query: unknown type %q\n", *qtype)
		return 2
	}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(fs.Arg(0)), t)
	c := &dns.Client{Timeout: *timeout}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dns-query:", err)
		return 1
	}
	fmt.Println(dns.RcodeToString[r.Rcode])
	for _, rr := range r.Answer {
		fmt.Println(rr.String())
	}
	if r.Rcode != dns.RcodeSuccess {
		return 3
	}
	return 0
}
