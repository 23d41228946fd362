// Command connector-vcsim serves govmomi's vCenter simulator (VPX model) for the
// connector's integration tests, with four changes:
//
//   - TLS with a certificate from the test CA (the simulator's own is RSA-1024,
//     which OpenSSL 3 rejects) and a required user name and password;
//   - disks created through ReconfigVM_Task get a sparse -flat.vmdk of their
//     capacity and a stable backing uuid;
//   - Changed Block Tracking: CreateSnapshot_Task records a changeId on each disk
//     and VirtualMachine.QueryChangedDiskAreas answers from a change log the tests
//     write (see cbt.go);
//   - a Fetch of an unset property (vm.snapshot without snapshots) answers "unset"
//     as vCenter does, instead of dropping the connection (see fetch.go);
//   - with -privileges-file, privilege checks grant only the listed privileges
//     (see privileges.go);
//   - with -faults-file, property retrievals give the faulty answers the file turns
//     on (see faults.go).
//
// It writes {"url", "port", "pid"} as JSON to -ready-file once it is serving, and
// exits on SIGTERM/SIGINT or, with -exit-with-parent, when its parent process dies.
package main

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

type readyInfo struct {
	URL  string `json:"url"`
	Port int    `json:"port"`
	PID  int    `json:"pid"`
}

func main() {
	certFile := flag.String("cert", "", "PEM server certificate (required)")
	keyFile := flag.String("key", "", "PEM server private key (required)")
	user := flag.String("user", "connector", "user name the server accepts")
	passwordFile := flag.String("password-file", "", "file holding the only password the server accepts (required)")
	listen := flag.String("listen", "127.0.0.1:0", "listen address (port 0: a free port)")
	readyFile := flag.String("ready-file", "", "write {url, port, pid} as JSON here once serving")
	cbtDir := flag.String("cbt-dir", "", "change-log directory: <dir>/<vm instance uuid>/<disk key>.log (required)")
	cbtPage := flag.Int("cbt-page", 4, "max areas returned by one QueryChangedDiskAreas call")
	vms := flag.Int("vms", 0, "VMs the model pre-creates per resource pool")
	exitWithParent := flag.Bool("exit-with-parent", false, "exit when the parent process dies")
	trace := flag.Bool("trace", false, "write SOAP traffic to stderr")
	stockFetch := flag.Bool("stock-fetch", false, "keep the simulator's Fetch, which drops the connection on an unset property")
	privilegesFile := flag.String("privileges-file", "", "while this file exists, grant only the privileges it lists (see privileges.go)")
	faults := flag.String("faults-file", "", "while this file exists, answer with the faults it lists (see faults.go)")
	flag.Parse()

	if *certFile == "" || *keyFile == "" || *passwordFile == "" || *cbtDir == "" {
		flag.Usage()
		os.Exit(2)
	}
	if *cbtPage < 1 {
		log.Fatal("-cbt-page must be >= 1")
	}
	log.SetPrefix("connector-vcsim: ")

	if err := run(options{
		certFile: *certFile, keyFile: *keyFile, user: *user, passwordFile: *passwordFile,
		listen: *listen, readyFile: *readyFile, cbtDir: *cbtDir, cbtPage: *cbtPage,
		vms: *vms, exitWithParent: *exitWithParent, trace: *trace, stockFetch: *stockFetch,
		privilegesFile: *privilegesFile, faultsFile: *faults,
	}); err != nil {
		log.Fatal(err)
	}
}

type options struct {
	certFile, keyFile, user, passwordFile, listen, readyFile, cbtDir string
	privilegesFile, faultsFile                                       string
	cbtPage, vms                                                     int
	exitWithParent, trace, stockFetch                                bool
}

func run(o options) error {
	parent := os.Getppid()

	raw, err := os.ReadFile(o.passwordFile)
	if err != nil {
		return fmt.Errorf("reading password file: %w", err)
	}
	password := strings.TrimRight(string(raw), "\r\n")
	if password == "" {
		return errors.New("password file is empty")
	}
	cert, err := tls.LoadX509KeyPair(o.certFile, o.keyFile)
	if err != nil {
		return fmt.Errorf("loading TLS certificate: %w", err)
	}
	if err := os.MkdirAll(o.cbtDir, 0o700); err != nil {
		return err
	}

	simulator.Trace = o.trace
	model := simulator.VPX()
	model.Machine = o.vms
	if err := model.Create(); err != nil {
		return fmt.Errorf("creating model: %w", err)
	}
	defer model.Remove()

	if !o.stockFetch {
		faultsFile = o.faultsFile
		installFetchFix(model.ServiceContent.PropertyCollector)
	}
	cbt := newCBT(o.cbtDir, o.cbtPage)
	cbt.install(model.Service)
	installPrivileges(*model.ServiceContent.AuthorizationManager, o.privilegesFile)

	model.Service.TLS = &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}
	model.Service.Listen = &url.URL{Host: o.listen, User: url.UserPassword(o.user, password)}
	server := model.Service.NewServer()
	defer server.Close()

	_, portStr, _ := net.SplitHostPort(server.URL.Host)
	port, _ := strconv.Atoi(portStr)
	u := *server.URL
	u.User = nil
	info := readyInfo{URL: u.String(), Port: port, PID: os.Getpid()}
	if o.readyFile != "" {
		if err := writeJSONAtomic(o.readyFile, info); err != nil {
			return err
		}
	}
	log.Printf("serving %s", info.URL)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	orphaned := make(chan struct{})
	if o.exitWithParent {
		go func() {
			for os.Getppid() == parent {
				time.Sleep(200 * time.Millisecond)
			}
			close(orphaned)
		}()
	}
	select {
	case s := <-stop:
		log.Printf("%s: exiting", s)
	case <-orphaned:
		log.Print("parent died: exiting")
	}
	return nil
}

func writeJSONAtomic(path string, v interface{}) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".ready-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}
