package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ledger is the payments service: every real execution of Charge appends a
// new charge, with a new id, to an in-memory ledger. It knows nothing about
// idempotency keys; the server interceptor in front of it makes sure it runs
// once per key.
type ledger struct {
	paymentsv1.UnimplementedPaymentsServiceServer

	latency atomic.Int64 // time.Duration each real charge takes

	// book, when set, keeps the charges in Postgres (serve --postgres);
	// otherwise they are kept in charges, in memory.
	book *pgBook
	// chaos, when set, may kill the process around a charge's write.
	chaos *chaos
	// hold, when set, runs just before a charge is written (tests: an
	// owner paused past its lease).
	hold func(ctx context.Context)

	mu      sync.Mutex
	charges []*paymentsv1.Charge
	// fences is the highest fence that wrote a charge, per key (see
	// errStaleFence).
	fences map[string]uint64
}

// errStaleFence refuses the charge of an owner whose lease ran out while a
// newer owner of the same key charged (a long GC pause, a stalled VM): the
// newer owner's fence (idempotency.FenceFromContext) is greater, and a
// charge is written only with a fence greater than every one written for
// its key. Aborted: the caller retries and is answered with the newer
// owner's stored outcome.
var errStaleFence = status.Error(codes.Aborted, "a newer attempt with this idempotency key has charged: this one is stale and charged nothing")

func newLedger(latency time.Duration) *ledger {
	l := &ledger{}
	l.setLatency(latency)
	return l
}

// setLatency makes each real charge take d, as a slow payment provider would.
func (l *ledger) setLatency(d time.Duration) { l.latency.Store(int64(d)) }

var currencyCode = regexp.MustCompile(`^[A-Z]{3}$`)

// Charge charges an account: it validates the request, waits for the
// "payment provider" and records a new charge.
func (l *ledger) Charge(ctx context.Context, req *paymentsv1.ChargeRequest) (*paymentsv1.ChargeResponse, error) {
	switch {
	case req.GetAccountId() == "":
		return nil, status.Error(codes.InvalidArgument, "account_id is required")
	case req.GetAmountCents() <= 0:
		return nil, status.Error(codes.InvalidArgument, "amount_cents must be positive")
	case !currencyCode.MatchString(req.GetCurrency()):
		return nil, status.Errorf(codes.InvalidArgument, "currency %q is not an ISO 4217 code such as EUR", req.GetCurrency())
	}
	// A real service passes the key on to its payment provider as the
	// provider's own idempotency key, so that a crash between the provider's
	// charge and the interceptor's record cannot charge twice either.
	providerKey, _ := idempotency.KeyFromContext(ctx)
	_ = providerKey // provider.Charge(ctx, providerKey, ...)
	if d := time.Duration(l.latency.Load()); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	c := &paymentsv1.Charge{
		Id:          newChargeID(),
		AccountId:   req.GetAccountId(),
		AmountCents: req.GetAmountCents(),
		Currency:    req.GetCurrency(),
		CreatedAt:   timestamppb.Now(),
	}
	if l.hold != nil {
		l.hold(ctx)
	}
	l.chaos.maybeKill("before-write")
	if l.book != nil {
		if err := l.book.add(ctx, c); errors.Is(err, errStaleFence) {
			return nil, errStaleFence
		} else if err != nil {
			return nil, status.Errorf(codes.Unavailable, "recording the charge: %v", err)
		}
		l.chaos.maybeKill("after-write")
		return &paymentsv1.ChargeResponse{Charge: c}, nil
	}
	l.mu.Lock()
	if key, fence, ok := fenceOf(ctx); ok {
		if fence <= l.fences[key] {
			l.mu.Unlock()
			return nil, errStaleFence
		}
		if l.fences == nil {
			l.fences = map[string]uint64{}
		}
		l.fences[key] = fence
	}
	l.charges = append(l.charges, c)
	l.mu.Unlock()
	l.chaos.maybeKill("after-write")
	return &paymentsv1.ChargeResponse{Charge: c}, nil
}

// ListCharges lists the charges of an account, oldest first; an empty
// account_id lists every charge.
func (l *ledger) ListCharges(ctx context.Context, req *paymentsv1.ListChargesRequest) (*paymentsv1.ListChargesResponse, error) {
	if l.book != nil {
		charges, err := l.book.list(ctx, req.GetAccountId())
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "listing the charges: %v", err)
		}
		return &paymentsv1.ListChargesResponse{Charges: charges}, nil
	}
	return &paymentsv1.ListChargesResponse{Charges: l.list(req.GetAccountId())}, nil
}

func (l *ledger) list(account string) []*paymentsv1.Charge {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*paymentsv1.Charge
	for _, c := range l.charges {
		if account == "" || c.GetAccountId() == account {
			out = append(out, c)
		}
	}
	return out
}

// fenceOf returns the call's idempotency key and its owner's fence, when
// the call has both (a keyed call through the interceptor).
func fenceOf(ctx context.Context) (key string, fence uint64, ok bool) {
	key, hasKey := idempotency.KeyFromContext(ctx)
	fence, hasFence := idempotency.FenceFromContext(ctx)
	return key, fence, hasKey && hasFence
}

func newChargeID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "ch_" + hex.EncodeToString(b[:])
}

// serverConfig describes one gRPC server of the example.
type serverConfig struct {
	ledger *ledger
	// store holds the idempotency records; nil runs the server without the
	// idempotency interceptor (the "before" picture).
	store idempotency.Store
	// opts are extra options of the idempotency interceptor.
	opts []idempotency.Option
	// faults, when set, loses chosen answers on their way back.
	faults *faults
	// logLine receives one line per call; nil logs nothing.
	logLine func(line string)
	// detailed adds error messages and durations to the log lines.
	detailed bool
	// metrics, when set, records the interceptor's events for /metrics
	// (see newMetrics).
	metrics func(context.Context, idempotency.Event)
}

// newServer builds the gRPC server, with p as its idempotency protocol (nil
// for none: the "before" picture). The interceptor chain, outermost first:
//
//  1. logCalls: one log line per call (what the idempotency interceptor did,
//     and what the client got);
//  2. faults (demo only): loses the answer of a chosen call after it ran, as
//     a network that drops a response on its way back would;
//  3. the idempotency interceptor, in front of the service.
func newServer(cfg serverConfig, p *idempotency.Protocol, opts ...grpc.ServerOption) *grpc.Server {
	chain := []grpc.UnaryServerInterceptor{logCalls(cfg)}
	if cfg.faults != nil {
		chain = append(chain, cfg.faults.intercept)
	}
	if p != nil {
		chain = append(chain, p.UnaryServerInterceptor())
	}
	srv := grpc.NewServer(append(opts, grpc.ChainUnaryInterceptor(chain...))...)
	paymentsv1.RegisterPaymentsServiceServer(srv, cfg.ledger)
	return srv
}

// newProtocol builds the idempotency protocol of cfg, which the gRPC server
// and the HTTP handler share (nil without a store): its observer hands each
// call's Event to the log line, the metrics and the chaos killer.
func newProtocol(cfg serverConfig) *idempotency.Protocol {
	if cfg.store == nil {
		return nil
	}
	observer := observe
	if m := cfg.metrics; m != nil {
		observer = func(ctx context.Context, e idempotency.Event) {
			observe(ctx, e)
			m(ctx, e)
		}
	}
	if c := cfg.ledger.chaos; c != nil {
		inner := observer
		observer = func(ctx context.Context, e idempotency.Event) {
			inner(ctx, e)
			if e.Outcome == idempotency.OutcomeExecuted {
				c.maybeKill("after-commit") // the outcome is stored; the answer not yet sent
			}
		}
	}
	iopts := append([]idempotency.Option{idempotency.WithObserver(observer)}, cfg.opts...)
	return idempotency.NewProtocol(cfg.store, iopts...)
}

// callNotes collects what the inner interceptors say about one call, for its
// log line.
type callNotes struct {
	mu    sync.Mutex
	event *idempotency.Event // from the idempotency interceptor's observer
	lost  string             // the answer the fault injector lost, described
}

type callNotesKey struct{}

func notesFrom(ctx context.Context) *callNotes {
	n, _ := ctx.Value(callNotesKey{}).(*callNotes)
	return n
}

// observe is the idempotency interceptor's observer ([idempotency.WithObserver]):
// it hands the call's Event to logCalls. newServer chains the metrics'
// observer after it when serve has --metrics-addr.
func observe(ctx context.Context, e idempotency.Event) {
	if n := notesFrom(ctx); n != nil {
		n.mu.Lock()
		n.event = &e
		n.mu.Unlock()
	}
}

// logCalls logs one line per call: the method, the idempotency key, what
// the idempotency interceptor did (executed, replayed, refused) and the
// answer. It logs the key itself, which is fine for a demo; a production
// server should log Event.KeyHash instead, since a key may be guessable or
// reused by its owner.
func logCalls(cfg serverConfig) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if cfg.logLine == nil {
			return handler(ctx, req)
		}
		notes := &callNotes{}
		start := time.Now()
		resp, err := handler(context.WithValue(ctx, callNotesKey{}, notes), req)
		md, _ := metadata.FromIncomingContext(ctx)
		cfg.logLine(callLine(cfg, path.Base(info.FullMethod), md.Get(idempotency.DefaultKeyHeader), notes, resp, err, time.Since(start)))
		return resp, err
	}
}

// callLine is the log line of one call to method, whose key header carried
// keys, after the inner interceptors left their notes: what the idempotency
// interceptor did and what the client got (err is a gRPC status error).
func callLine(cfg serverConfig, method string, keys []string, notes *callNotes, resp any, err error, elapsed time.Duration) string {
	notes.mu.Lock()
	ev, lost := notes.event, notes.lost
	notes.mu.Unlock()

	var b strings.Builder
	fmt.Fprintf(&b, "%s key=%s %s: ", method, keyForLog(keys), verdict(ev, cfg.store != nil))
	if lost != "" {
		fmt.Fprintf(&b, "%s, but the answer is lost on the way back (simulated): the client gets %s",
			lost, status.Code(err))
	} else {
		b.WriteString(answer(resp, err, cfg.detailed))
	}
	if cfg.detailed {
		fmt.Fprintf(&b, ", %.1fms", float64(elapsed.Microseconds())/1000)
	}
	return b.String()
}

// keyForLog shows the key as sent, quoted when it is not a valid key (so
// that it cannot forge log lines), "-" when there is none.
func keyForLog(vals []string) string {
	switch {
	case len(vals) == 0:
		return "-"
	case len(vals) == 1 && idempotency.ValidateKey(vals[0]) == nil:
		return vals[0]
	}
	k := strings.Join(vals, ",")
	if len(k) > 64 {
		k = k[:64] + "..."
	}
	return strconv.Quote(k)
}

// verdict says what the idempotency interceptor did with a call.
func verdict(ev *idempotency.Event, protected bool) string {
	switch {
	case !protected:
		return "executed (no idempotency interceptor)"
	case ev == nil:
		return "passed through (no side effects, not intercepted)"
	}
	switch ev.Outcome {
	case idempotency.OutcomeExecuted:
		return "executed"
	case idempotency.OutcomeReplayed:
		return "replayed"
	case idempotency.OutcomePassThrough:
		return "executed (no key)"
	case idempotency.OutcomeReleased:
		return "executed, outcome not stored (transient error)"
	case idempotency.OutcomeTooLarge, idempotency.OutcomeLeaseLost, idempotency.OutcomeNotStored,
		idempotency.OutcomeNotReplicated, idempotency.OutcomeFailOpen, idempotency.OutcomePanicked:
		return "executed (" + string(ev.Outcome) + ")"
	case idempotency.OutcomeRolledBack:
		return "executed, then rolled back: nothing it wrote was kept"
	case idempotency.OutcomeCommitUnknown:
		return "executed, but the commit's reply was lost"
	default:
		return "refused (" + string(ev.Outcome) + ")"
	}
}

// answer describes what the server answered; withMessage adds an error's
// message.
func answer(resp any, err error, withMessage bool) string {
	if err != nil {
		st := status.Convert(err)
		s := st.Code().String()
		if r := idempotency.ReasonOf(err); r != "" {
			s += " " + r
		}
		if withMessage {
			s += ": " + st.Message()
		}
		return s
	}
	if l, ok := resp.(*paymentsv1.ListChargesResponse); ok {
		return fmt.Sprintf("OK, %d charge(s)", len(l.GetCharges()))
	}
	return "OK" + chargeOf(resp)
}

func chargeOf(resp any) string {
	if r, ok := resp.(*paymentsv1.ChargeResponse); ok {
		c := r.GetCharge()
		return fmt.Sprintf(" %s (%s on %s)", c.GetId(), money(c.GetAmountCents(), c.GetCurrency()), c.GetAccountId())
	}
	return ""
}

// money formats an amount in minor units: 1999, "EUR" is "19.99 EUR".
func money(cents int64, currency string) string {
	sign := ""
	if cents < 0 {
		sign, cents = "-", -cents
	}
	return fmt.Sprintf("%s%d.%02d %s", sign, cents/100, cents%100, currency)
}

// faults loses the answers of chosen calls after the service handled them,
// like a connection that breaks while the response is on its way back: the
// charge was made, the client sees Unavailable. It sits before (outside) the
// idempotency interceptor, so the outcome is stored before the answer is
// lost. It is part of the demo, not something to deploy.
type faults struct {
	mu   sync.Mutex
	lose map[string]int // account id -> how many answers still to lose
}

// loseNextAnswer makes the next Charge of account lose its answer.
func (f *faults) loseNextAnswer(account string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lose == nil {
		f.lose = make(map[string]int)
	}
	f.lose[account]++
}

func (f *faults) take(req any) bool {
	r, ok := req.(*paymentsv1.ChargeRequest)
	if !ok {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lose[r.GetAccountId()] == 0 {
		return false
	}
	f.lose[r.GetAccountId()]--
	return true
}

func (f *faults) intercept(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if !f.take(req) {
		return resp, err
	}
	if n := notesFrom(ctx); n != nil {
		n.mu.Lock()
		n.lost = answer(resp, err, false)
		n.mu.Unlock()
	}
	return nil, status.Error(codes.Unavailable, "connection lost before the answer arrived (simulated)")
}

// redisStore is the idempotency store the commands use: a [idempotency.RedisStore]
// (which is also an [idempotency.AdminStore], for inspect and forget).
type redisStore struct {
	*idempotency.RedisStore
	// desc describes where it is, for the logs.
	desc string
	// embeddedAddr is the address of the embedded Redis, "" for an
	// external one.
	embeddedAddr string
	// close releases the client and stops the embedded Redis.
	close func()
}

// openStore returns the idempotency store: Redis at addrs (one host:port,
// or a comma-separated list for a Redis Cluster), or, when addrs is empty,
// an embedded Redis (miniredis) started in this process.
func openStore(ctx context.Context, addrs string) (*redisStore, error) {
	if strings.TrimSpace(addrs) == "" {
		mr, err := miniredis.Run()
		if err != nil {
			return nil, fmt.Errorf("starting the embedded Redis: %w", err)
		}
		// Let time to live run on the wall clock, as in Redis (miniredis
		// only counts it down on FastForward otherwise): leases end, and
		// inspect shows the TTL actually left.
		mr.ClockTTL(true)
		rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{mr.Addr()}, ContextTimeoutEnabled: true})
		return &redisStore{
			// miniredis has no CONFIG GET, and its memory is the process's:
			// there is no eviction policy to check.
			RedisStore:   idempotency.NewRedisStore(rdb, idempotency.WithRedisLogger(nil)),
			desc:         "embedded Redis (miniredis) at " + mr.Addr(),
			embeddedAddr: mr.Addr(),
			close:        func() { _ = rdb.Close(); mr.Close() },
		}, nil
	}
	var list []string
	for _, a := range strings.Split(addrs, ",") {
		if a = strings.TrimSpace(a); a != "" {
			list = append(list, a)
		}
	}
	// One address: a plain client; several: a Redis Cluster client.
	// ContextTimeoutEnabled: go-redis then honours the deadlines the
	// interceptor sets (claim wait, renew and complete bounds).
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: list, ContextTimeoutEnabled: true})
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(pctx).Err(); err != nil {
		_ = rdb.Close()
		return nil, fmt.Errorf("cannot reach Redis at %s: %w", strings.Join(list, ","), err)
	}
	desc := "Redis at " + list[0]
	if len(list) > 1 {
		desc = "Redis Cluster at " + strings.Join(list, ",")
	}
	return &redisStore{RedisStore: idempotency.NewRedisStore(rdb), desc: desc, close: func() { _ = rdb.Close() }}, nil
}
