// Command payments is the runnable demo of the idempotency package: a small
// payments service whose Charge must never run twice for one idempotency
// key, on an embedded Redis, so that nothing needs to be installed.
//
// Usage:
//
//	go run ./examples/payments [demo] [--redis ADDRS]
//	go run ./examples/payments serve [--addr 127.0.0.1:50051] [--http-addr 127.0.0.1:8080] [--redis ADDRS] [--latency DURATION] [--metrics-addr 127.0.0.1:9464] [--local-cache N] [--quiet] [--bare]
//	go run ./examples/payments client [--addr 127.0.0.1:50051] [--account A] [--amount CENTS] [--currency EUR] [--key K]
//	go run ./examples/payments consume --redis ADDRS [--stream charges] [--group payments] [--consumer NAME] [--claim-idle 30s] [--postgres DSN]
//	go run ./examples/payments inspect --redis ADDRS --key K [--method /payments.v1.PaymentsService/Charge] [--scope S]
//	go run ./examples/payments forget --redis ADDRS --key K [--method /payments.v1.PaymentsService/Charge] [--scope S]
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
// ledger lives in memory and starts empty on each start. Without --redis,
// serve logs the address of its embedded Redis ("embedded Redis at
// 127.0.0.1:PORT"), which inspect and forget can use while serve runs.
//
// With --http-addr, serve also serves the service to HTTP clients through
// connect-go and the connect module's interceptor: the Connect protocol
// (curl or fetch with JSON, the key in an Idempotency-Key header, quoted as
// the IETF draft has it or bare), gRPC-Web, and gRPC over h2c. Both sides
// share one idempotency.Protocol, so a key is one key whichever way the
// calls come: a charge made with grpcurl is replayed to curl, marked
// Idempotency-Replayed: true.
//
// Three serve flags are for benchmarks such as bench/ghz.sh: --quiet logs
// no line per call (formatting and writing it would cost more than the
// interceptor); --local-cache N turns on the interceptor's local cache of
// completed records (idempotency.WithLocalCache, N entries, each kept for
// up to a minute), so that a repeat on this server needs no store round
// trip; --bare serves the same service without the idempotency interceptor
// and without a store, as the baseline: a client's idempotency-key is
// ignored and every call charges. --bare takes none of --redis, --postgres,
// --lease, --local-cache and --chaos-kill.
//
// With --metrics-addr, serve also serves the interceptor's metrics over
// HTTP at /metrics, through the otel module's observer and OpenTelemetry's
// Prometheus exporter:
// idempotency_server_calls_total (a counter, by rpc_method,
// idempotency_outcome and idempotency_replayed) and
// idempotency_store_duration_seconds (a histogram of the time spent in the
// store per call, by rpc_method and idempotency_outcome). Try
// "curl -s 127.0.0.1:9464/metrics | grep idempotency_" as calls come in.
//
// client sends one Charge to a running server through the client
// interceptor, which retries Unavailable with the same key, and prints the
// charge, the key used and whether the answer was a replay. Without --key the
// interceptor generates a key; pass it back with --key to repeat the call.
//
// consume charges the messages of a Redis stream (XADD charges '*'
// account_id acct_1 amount_cents 1999 currency EUR [idempotency_key K]) as
// a member of a consumer group, through idempotency.Do: once per message's
// key (its idempotency_key field, or its id), however often the message is
// delivered. A message is acknowledged (XACK) once charged or refused for
// good; one left pending by a consumer that died is claimed (XAUTOCLAIM) by
// another after --claim-idle, and its charge is made, or replayed if it was
// made, with its key. With --postgres the charges and the idempotency
// records are in Postgres and each charge commits with its outcome; without
// it the records are in the stream's Redis and the charges in memory.
//
// inspect looks up the record of the key a client sent to a method (Charge
// by default; with --scope when the server scopes keys), for the "my charge
// is stuck in progress" ticket: its state (in_progress, completed or
// too_large), method, age, time to live, the stored code (OK, or the error
// that repeats get back) and the size of the stored response, never the
// response itself. It exits 1 when there is no record. forget deletes the
// record, so that the next call with the key runs the handler again; forget
// an in-progress record only when its call is known to be dead. Both need
// --redis: the records live in Redis, not in the serve process.
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
	"net/http"
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
  payments serve [--addr 127.0.0.1:50051] [--http-addr 127.0.0.1:8080] [--redis ADDRS] [--latency DURATION] [--metrics-addr 127.0.0.1:9464]
      serve payments.v1.PaymentsService (with reflection) until SIGINT/SIGTERM,
      with --http-addr to HTTP clients too (Connect, gRPC-Web; try curl),
      and with --metrics-addr its idempotency metrics at http://ADDR/metrics;
      for benchmarks: --quiet, --local-cache N, --bare (no interceptor)
  payments client [--addr 127.0.0.1:50051] [--account A] [--amount CENTS] [--currency EUR] [--key K]
      send one Charge through the client interceptor and print the outcome
  payments consume --redis ADDRS [--stream charges] [--group payments] [--consumer NAME] [--claim-idle 30s] [--postgres DSN]
      charge each message of a Redis stream once per key, as a consumer group member
      (XREADGROUP, XACK; XAUTOCLAIM takes over a dead consumer's messages)
  payments inspect --redis ADDRS --key K [--method /payments.v1.PaymentsService/Charge] [--scope S]
      show the stored record of a key: state, age, TTL, code, size (exit 1 if none)
  payments forget --redis ADDRS --key K [--method /payments.v1.PaymentsService/Charge] [--scope S]
      delete the record of a key, so that its next call runs again

ADDRS is host:port, or a comma-separated list of Redis Cluster nodes; without
--redis, demo and serve use an embedded Redis (miniredis), whose address serve
logs for inspect and forget. "payments COMMAND -h" lists a command's flags.
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
	case "consume":
		err = consumeCommand(ctx, args, stderr)
	case "inspect":
		err = inspectCommand(ctx, args, stdout, stderr)
	case "forget":
		err = forgetCommand(ctx, args, stdout, stderr)
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
	store, err := openStore(ctx, *redisAddrs)
	if err != nil {
		return err
	}
	defer store.close()
	return runStory(ctx, stdout, store, store.desc)
}

func serveCommand(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("serve", "serve [--addr 127.0.0.1:50051] [--http-addr 127.0.0.1:8080] [--redis ADDRS] [--postgres DSN] [--lease DURATION] [--local-cache N] [--latency DURATION] [--metrics-addr 127.0.0.1:9464] [--quiet] [--bare]", stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "`host:port` to listen on")
	httpAddr := fs.String("http-addr", "", "`host:port` to also serve the service on to HTTP clients through connect-go (the Connect protocol, e.g. curl; gRPC-Web; gRPC over h2c), with the same idempotency state as the gRPC server (default: none)")
	redisAddrs := fs.String("redis", "", redisFlagHelp)
	pgDSN := fs.String("postgres", "", "keep the charges in the `DSN`'s charges table (created if missing), and, unless --redis is given too, the idempotency records in its idempotency_records table, committed in the same transaction as each charge")
	lease := fs.Duration("lease", 0, "the idempotency lease of a running call (default 30s)")
	latency := fs.Duration("latency", 0, "how long each real charge takes, like a slow payment provider (e.g. 2s)")
	metricsAddr := fs.String("metrics-addr", "", "`host:port` to serve the idempotency metrics on, at /metrics in the Prometheus text format (default: none)")
	chaosKill := fs.Float64("chaos-kill", 0, "for crash tests: the `probability` that the process SIGKILLs itself at each of three points of a charge (before its write, after it, after the outcome is stored)")
	localCache := fs.Int("local-cache", 0, "keep up to `N` completed records in process memory, each for up to "+localCacheAge.String()+" (idempotency.WithLocalCache), so that a repeat on this server needs no store round trip (default 0: off)")
	quiet := fs.Bool("quiet", false, "for benchmarks: log no line per call (the start, stop and warning lines stay)")
	bare := fs.Bool("bare", false, "for benchmarks: serve without the idempotency interceptor and without a store, as the baseline: the idempotency-key a client sends is ignored and every call charges")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *localCache < 0 {
		return fmt.Errorf("--local-cache %d: want a number of entries, or 0 for none", *localCache)
	}
	if *bare {
		var clash []string
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "redis", "postgres", "lease", "local-cache", "chaos-kill":
				clash = append(clash, "--"+f.Name)
			}
		})
		if len(clash) > 0 {
			return fmt.Errorf("--bare serves without the idempotency interceptor and its store: drop %s", strings.Join(clash, ", "))
		}
	}
	if *lease < 0 || (*lease > 0 && *lease < time.Millisecond) {
		return fmt.Errorf("--lease %v: want at least 1ms", *lease)
	}
	if *chaosKill < 0 || *chaosKill >= 1 {
		return fmt.Errorf("--chaos-kill %v: want a probability in [0, 1)", *chaosKill)
	}
	logger := log.New(stderr, "", log.LstdFlags)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var store idempotency.Store
	var storeDesc, embeddedAddr string
	var book *pgBook
	if *pgDSN != "" {
		var err error
		if book, err = openBook(ctx, *pgDSN); err != nil {
			return err
		}
		defer book.pool.Close()
	}
	switch {
	case *bare:
		storeDesc = "none (--bare: no idempotency interceptor, keys are ignored)"
	case book != nil && *redisAddrs == "":
		pgStore, err := openPostgresStore(ctx, book.pool, logger.Printf)
		if err != nil {
			return err
		}
		store, storeDesc = pgStore, "Postgres (each charge and its outcome commit in one transaction)"
	default:
		rs, err := openStore(ctx, *redisAddrs)
		if err != nil {
			return err
		}
		defer rs.close()
		store, storeDesc, embeddedAddr = rs, rs.desc, rs.embeddedAddr
		if book != nil {
			storeDesc += "; charges in Postgres, each in a transaction of its own"
		}
	}
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	defer lis.Close()
	var httpLis net.Listener
	if *httpAddr != "" {
		if httpLis, err = net.Listen("tcp", *httpAddr); err != nil {
			return fmt.Errorf("http: %w", err)
		}
		defer httpLis.Close()
	}
	var metricsLis net.Listener
	if *metricsAddr != "" {
		if metricsLis, err = net.Listen("tcp", *metricsAddr); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer metricsLis.Close()
	}
	logger.Printf("serving payments.v1.PaymentsService on %s (reflection on); idempotency store: %s; latency per charge: %s",
		lis.Addr(), storeDesc, *latency)
	if embeddedAddr != "" {
		logger.Printf("embedded Redis at %s: while this server runs, look a record up with: payments inspect --redis %s --key K",
			embeddedAddr, embeddedAddr)
	}
	if metricsLis != nil {
		logger.Printf("metrics at http://%s/metrics (Prometheus text format)", metricsLis.Addr())
	}
	if *localCache > 0 {
		logger.Printf("local cache: up to %d completed records in memory, each for up to %s", *localCache, localCacheAge)
	}
	if *quiet {
		logger.Print("--quiet: no log line per call")
	}
	if httpLis != nil {
		logger.Printf("serving payments.v1.PaymentsService to HTTP clients (Connect, gRPC-Web, gRPC over h2c) on http://%s, sharing the idempotency state with gRPC", httpLis.Addr())
		logger.Printf(`try: curl -s -D - -H 'Content-Type: application/json' -H 'Idempotency-Key: "k1"' -d '{"account_id":"acct_1","amount_cents":1999,"currency":"EUR"}' http://%s/payments.v1.PaymentsService/Charge`, httpLis.Addr())
	}
	logger.Printf("try: grpcurl -plaintext -H 'idempotency-key: k1' -d '{\"account_id\":\"acct_1\",\"amount_cents\":1999,\"currency\":\"EUR\"}' %s payments.v1.PaymentsService/Charge", lis.Addr())
	o := serveOptions{store: store, latency: *latency, metricsLis: metricsLis, httpLis: httpLis, logger: logger, book: book, quiet: *quiet}
	if *lease > 0 {
		o.opts = append(o.opts, idempotency.WithLease(*lease))
	}
	if *localCache > 0 {
		o.opts = append(o.opts, idempotency.WithLocalCache(*localCache, localCacheAge))
	}
	if *chaosKill > 0 {
		o.chaos = &chaos{rate: *chaosKill, logf: logger.Printf}
	}
	return serve(ctx, lis, o)
}

// localCacheAge is how long serve --local-cache keeps a record in memory
// at most.
const localCacheAge = time.Minute

// serveOptions configure serve.
type serveOptions struct {
	// store holds the idempotency records; nil serves without the
	// idempotency interceptor (--bare).
	store   idempotency.Store
	latency time.Duration
	// metricsLis, when set, serves the interceptor's metrics at /metrics.
	metricsLis net.Listener
	// httpLis, when set, serves the service to connect-go's protocols.
	httpLis net.Listener
	logger  *log.Logger
	// quiet logs no line per call.
	quiet bool
	// book, when set, keeps the charges in Postgres.
	book *pgBook
	// opts are extra options of the idempotency interceptor.
	opts []idempotency.Option
	// chaos, when set, may kill the process around each charge.
	chaos *chaos
}

// serve serves the payments service on lis until ctx is done, then stops
// gracefully: it stops accepting calls and waits (up to 10 s) for those in
// flight. The metrics endpoint, if any, stays up until they are done.
func serve(ctx context.Context, lis net.Listener, o serveOptions) error {
	logger := o.logger
	led := newLedger(o.latency)
	led.book, led.chaos = o.book, o.chaos
	cfg := serverConfig{
		ledger:   led,
		store:    o.store,
		opts:     append([]idempotency.Option{idempotency.WithLogger(slog.New(slog.NewTextHandler(logger.Writer(), nil)))}, o.opts...),
		logLine:  func(line string) { logger.Print(line) },
		detailed: true,
	}
	if o.quiet {
		cfg.logLine = nil
	}
	var metricsSrv *http.Server
	metricsServed := make(chan error, 1)
	if o.metricsLis != nil {
		observe, handler, err := newMetrics()
		if err != nil {
			return err
		}
		cfg.metrics = observe
		metricsSrv = &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
		go func() { metricsServed <- metricsSrv.Serve(o.metricsLis) }()
	}
	p := newProtocol(cfg)
	srv := newServer(cfg, p)
	reflection.Register(srv)
	var httpSrv *http.Server
	httpServed := make(chan error, 1)
	if o.httpLis != nil {
		httpSrv = &http.Server{Handler: newHTTPHandler(cfg, p), ReadHeaderTimeout: 10 * time.Second, Protocols: new(http.Protocols)}
		httpSrv.Protocols.SetHTTP1(true)
		httpSrv.Protocols.SetUnencryptedHTTP2(true)
		go func() { httpServed <- httpSrv.Serve(o.httpLis) }()
	}

	metricsFailed := false
	defer func() { // after the gRPC server, so that the last calls can be scraped
		if metricsSrv != nil {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = metricsSrv.Shutdown(sctx)
			cancel()
			if !metricsFailed {
				<-metricsServed // http.ErrServerClosed
			}
		}
	}()

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	var failed error
	select {
	case err := <-served:
		return err
	case err := <-metricsServed:
		metricsFailed, failed = true, fmt.Errorf("metrics: %w", err)
		logger.Printf("stopping: %v", failed)
	case err := <-httpServed:
		failed = fmt.Errorf("http: %w", err)
		httpSrv = nil
		logger.Printf("stopping: %v", failed)
	case <-ctx.Done():
	}
	logger.Print("stopping: waiting for the calls in flight")
	stopped := make(chan struct{})
	httpStopped := make(chan struct{})
	stopCtx, stopNow := context.WithCancel(context.WithoutCancel(ctx))
	defer stopNow()
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	go func() {
		// Waits for the HTTP calls in flight, as GracefulStop does for gRPC.
		if httpSrv != nil && httpSrv.Shutdown(stopCtx) != nil {
			_ = httpSrv.Close()
		}
		close(httpStopped)
	}()
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		logger.Print("calls still running after 10s: closing them")
		srv.Stop()
		stopNow()
		<-stopped
	}
	select {
	case <-httpStopped:
	case <-t.C:
		logger.Print("HTTP calls still running after 10s: closing them")
		stopNow()
		<-httpStopped
	}
	<-served // nil once stopped
	if failed != nil {
		return failed
	}
	logger.Print("stopped")
	return nil
}
