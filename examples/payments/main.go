// Command payments is the runnable demo of the idempotency package: a small
// payments service whose Charge must never run twice for one idempotency
// key, on an embedded Redis, so that nothing needs to be installed.
//
// Usage:
//
//	go run ./examples/payments [demo] [--redis ADDRS]
//	go run ./examples/payments serve [--addr 127.0.0.1:50051] [--redis ADDRS] [--latency DURATION]
//	go run ./examples/payments client [--addr 127.0.0.1:50051] [--account A] [--amount CENTS] [--currency EUR] [--key K]
//
// demo (the default command) tells the double-charge story on the terminal:
// a charge whose answer is lost on the way back and is retried with the same
// key (charged once, the retry gets the stored answer); a double click (two
// concurrent identical calls with one key, charged once); the same key
// reused for a different amount (refused with FailedPrecondition, reason
// KEY_REUSED); and, for contrast, the lost answer again with the
// interceptors switched off (charged twice). It ends with the ledger and
// exits 0 only if every expectation held, 1 otherwise.
//
// serve runs the payments.v1.PaymentsService for real clients until SIGINT
// or SIGTERM, then stops gracefully. It registers gRPC server reflection, so
// grpcurl needs no .proto files, and logs one line per call: the method, the
// idempotency key (logged in clear because this is a demo; log
// Event.KeyHash in production) and what the interceptor did (executed,
// replayed or refused). --latency makes each real charge take that long, like
// a slow payment provider, so that in-flight duplicates can be seen. The
// ledger lives in memory and starts empty on each start.
//
// client sends one Charge to a running server through the client
// interceptor, which retries Unavailable with the same key, and prints the
// charge, the key used and whether the answer was a replay. Without --key the
// interceptor generates a key; pass it back with --key to repeat the call.
//
// ADDRS is host:port of one Redis, or a comma-separated list of Redis
// Cluster nodes. Without --redis, demo and serve start an embedded Redis
// (miniredis) in the process.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/grpc/reflection"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usageText = `Usage:
  payments [demo] [--redis ADDRS]
      tell the double-charge story and check it (exit 0 if every expectation held)
  payments serve [--addr 127.0.0.1:50051] [--redis ADDRS] [--latency DURATION]
      serve payments.v1.PaymentsService (with reflection) until SIGINT/SIGTERM
  payments client [--addr 127.0.0.1:50051] [--account A] [--amount CENTS] [--currency EUR] [--key K]
      send one Charge through the client interceptor and print the outcome

ADDRS is host:port, or a comma-separated list of Redis Cluster nodes; without
--redis an embedded Redis (miniredis) is used. "payments COMMAND -h" lists a
command's flags.
`

// run runs the command in args and returns the exit code: 0 on success, 1
// when the command failed, 2 on a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := "demo"
	if len(args) > 0 && (!strings.HasPrefix(args[0], "-") || isHelp(args[0])) {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "demo":
		err = demoCommand(ctx, args, stdout, stderr)
	case "serve":
		err = serveCommand(ctx, args, stderr)
	case "client":
		err = clientCommand(ctx, args, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return 0
	default:
		fmt.Fprintf(stderr, "payments: unknown command %q\n\n%s", cmd, usageText)
		return 2
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "payments %s: %v\n", cmd, err)
		return 1
	}
}

func isHelp(arg string) bool {
	switch arg {
	case "-h", "-help", "--help":
		return true
	}
	return false
}

// errUsage reports bad flags or arguments; the flag set has already said why.
var errUsage = errors.New("usage error")

// newFlagSet returns a flag set for a command that reports errors on stderr.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: payments %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

const redisFlagHelp = "Redis `ADDRS`: host:port, or a comma-separated list of Redis Cluster nodes (default: an embedded Redis)"

func demoCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", "[demo] [--redis ADDRS]", stderr)
	redisAddrs := fs.String("redis", "", redisFlagHelp)
	if err := parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	store, desc, closeStore, err := openStore(ctx, *redisAddrs)
	if err != nil {
		return err
	}
	defer closeStore()
	return runStory(ctx, stdout, store, desc)
}

func serveCommand(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("serve", "serve [--addr 127.0.0.1:50051] [--redis ADDRS] [--latency DURATION]", stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "`host:port` to listen on")
	redisAddrs := fs.String("redis", "", redisFlagHelp)
	latency := fs.Duration("latency", 0, "how long each real charge takes, like a slow payment provider (e.g. 2s)")
	if err := parse(fs, args); err != nil {
		return err
	}
	store, desc, closeStore, err := openStore(ctx, *redisAddrs)
	if err != nil {
		return err
	}
	defer closeStore()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	logger := log.New(stderr, "", log.LstdFlags)
	logger.Printf("serving payments.v1.PaymentsService on %s (reflection on); idempotency store: %s; latency per charge: %s",
		lis.Addr(), desc, *latency)
	logger.Printf("try: grpcurl -plaintext -H 'idempotency-key: k1' -d '{\"account_id\":\"acct_1\",\"amount_cents\":1999,\"currency\":\"EUR\"}' %s payments.v1.PaymentsService/Charge", lis.Addr())
	return serve(ctx, lis, store, *latency, logger)
}

// serve serves the payments service on lis until ctx is done, then stops
// gracefully: it stops accepting calls and waits (up to 10 s) for those in
// flight.
func serve(ctx context.Context, lis net.Listener, store idempotency.Store, latency time.Duration, logger *log.Logger) error {
	srv := newServer(serverConfig{
		ledger:   newLedger(latency),
		store:    store,
		opts:     []idempotency.Option{idempotency.WithLogger(slog.New(slog.NewTextHandler(logger.Writer(), nil)))},
		logLine:  func(line string) { logger.Print(line) },
		detailed: true,
	})
	reflection.Register(srv)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	logger.Print("stopping: waiting for the calls in flight")
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		logger.Print("calls still running after 10s: closing them")
		srv.Stop()
		<-stopped
	}
	<-served // nil once stopped
	logger.Print("stopped")
	return nil
}
