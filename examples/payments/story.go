package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// The accounts of the story, one per chapter, so that the ledger at the end
// shows each chapter's outcome.
const (
	acctLostAnswer  = "acct_lost_answer"
	acctDoubleClick = "acct_double_click"
	acctReusedKey   = "acct_reused_key"
	acctUnprotected = "acct_unprotected"
)

// slowProvider is the latency of each charge during the double click, long
// enough for the two clicks to overlap.
const slowProvider = 300 * time.Millisecond

// runStory tells the demo's story on w: it starts two payments servers on
// loopback sharing one ledger, one behind the idempotency interceptor (on
// store) and one without it, and a client with and one without the client
// interceptor, then plays the chapters and checks every expectation. It
// returns an error naming the expectations that did not hold.
func runStory(ctx context.Context, w io.Writer, store idempotency.Store, storeDesc string) error {
	out := &syncWriter{w: w}
	led := newLedger(0)
	flt := &faults{}
	logLine := func(line string) { fmt.Fprintf(out, "   server: %s\n", line) }

	fmt.Fprintf(out, "The double-charge demo: idempotency keys for gRPC\n")
	fmt.Fprintf(out, "Idempotency store: %s. Servers and clients on loopback.\n", storeDesc)

	protectedAddr, stopProtected, err := startServer(serverConfig{ledger: led, store: store, faults: flt, logLine: logLine})
	if err != nil {
		return err
	}
	defer stopProtected()
	unprotectedAddr, stopUnprotected, err := startServer(serverConfig{ledger: led, faults: flt, logLine: logLine})
	if err != nil {
		return err
	}
	defer stopUnprotected()

	// The client interceptor gives every Charge a key (or the one from
	// idempotency.WithKey) and retries Unavailable and KEY_IN_PROGRESS with it.
	conn, err := dial(protectedAddr, grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()))
	if err != nil {
		return err
	}
	defer conn.Close()
	plainConn, err := dial(unprotectedAddr)
	if err != nil {
		return err
	}
	defer plainConn.Close()

	s := &story{
		out:     out,
		check:   &checker{w: out},
		ledger:  led,
		faults:  flt,
		client:  paymentsv1.NewPaymentsServiceClient(conn),
		plain:   paymentsv1.NewPaymentsServiceClient(plainConn),
		keyTail: randomHex(3), // keys unique per run, should --redis point at a Redis kept between runs
	}
	s.lostAnswer(ctx)
	s.doubleClick(ctx)
	s.reusedKey(ctx)
	s.withoutIdempotency(ctx)
	s.showLedger(ctx)

	if err := ctx.Err(); err != nil {
		return fmt.Errorf("the story was interrupted: %w", err)
	}
	if failed := s.check.failed; len(failed) > 0 {
		fmt.Fprintf(out, "\n%d of %d expectations FAILED.\n", len(failed), s.check.n)
		return fmt.Errorf("%d of %d expectations failed: %s", len(failed), s.check.n, strings.Join(failed, "; "))
	}
	fmt.Fprintf(out, "\nAll %d expectations held.\n", s.check.n)
	return nil
}

type story struct {
	out     io.Writer
	check   *checker
	ledger  *ledger
	faults  *faults
	client  paymentsv1.PaymentsServiceClient // through the idempotency interceptors
	plain   paymentsv1.PaymentsServiceClient // no interceptors at either end
	keyTail string
}

func (s *story) say(format string, args ...any) { fmt.Fprintf(s.out, format+"\n", args...) }

// lostAnswer: the charge is made, its answer is lost, the client retries
// with the same key and gets the stored answer.
func (s *story) lostAnswer(ctx context.Context) {
	s.say("\n1. A lost answer")
	s.say("   The client charges %s to %s. The server makes the charge, but", money(1999, "EUR"), acctLostAnswer)
	s.say("   the connection breaks before the answer arrives: the client sees Unavailable")
	s.say("   and its interceptor retries, with the same idempotency key.")
	s.faults.loseNextAnswer(acctLostAnswer)
	var info idempotency.CallInfo
	resp, err := s.client.Charge(ctx, &paymentsv1.ChargeRequest{AccountId: acctLostAnswer, AmountCents: 1999, Currency: "EUR"},
		idempotency.CallResult(&info))
	s.clientSays(resp, err, info)
	charges := s.ledger.list(acctLostAnswer)
	s.check.expect(err == nil && info.Attempts == 2 && info.Replayed,
		"the retry got the stored answer (2 attempts, replayed)")
	s.check.expect(len(charges) == 1 && resp.GetCharge().GetId() == charges[0].GetId(),
		"%s was charged once (%s)", acctLostAnswer, ids(charges))
}

// doubleClick: two identical calls with the same key at the same time.
func (s *story) doubleClick(ctx context.Context) {
	key := "order-1001-" + s.keyTail
	s.say("\n2. A double click")
	s.say("   The payment provider is slow now (%s per charge). The user clicks Pay twice:", slowProvider)
	s.say("   two identical calls, at the same time, with the key %s (set with WithKey).", key)
	s.ledger.setLatency(slowProvider)
	defer s.ledger.setLatency(0)

	type click struct {
		resp *paymentsv1.ChargeResponse
		err  error
		info idempotency.CallInfo
	}
	var clicks [2]click
	var wg sync.WaitGroup
	for i := range clicks {
		wg.Go(func() {
			c := &clicks[i]
			c.resp, c.err = s.client.Charge(idempotency.WithKey(ctx, key),
				&paymentsv1.ChargeRequest{AccountId: acctDoubleClick, AmountCents: 4500, Currency: "EUR"},
				idempotency.CallResult(&c.info))
		})
	}
	wg.Wait()

	replays, sameCharge := 0, true
	for i, c := range clicks {
		s.say("   click %d: %s", i+1, clientResult(c.resp, c.err, c.info))
		if c.info.Replayed {
			replays++
			if c.info.Attempts > 1 {
				s.say("            (it met the other click still running: Aborted, KEY_IN_PROGRESS; the")
				s.say("            interceptor waited the server's RetryInfo delay and tried again)")
			}
		}
		sameCharge = sameCharge && c.err == nil && c.resp.GetCharge().GetId() == clicks[0].resp.GetCharge().GetId()
	}
	charges := s.ledger.list(acctDoubleClick)
	s.check.expect(sameCharge && replays == 1, "both clicks got the same charge, one of them as a replay")
	s.check.expect(len(charges) == 1, "%s was charged once (%s)", acctDoubleClick, ids(charges))
}

// reusedKey: the same key for a different request is refused.
func (s *story) reusedKey(ctx context.Context) {
	key := "order-1002-" + s.keyTail
	s.say("\n3. The same key for a different amount")
	s.say("   A buggy client charges %s with the key %s, then sends", money(1000, "EUR"), key)
	s.say("   %s with that same key.", money(2500, "EUR"))
	kctx := idempotency.WithKey(ctx, key)
	var first, second idempotency.CallInfo
	resp, err := s.client.Charge(kctx, &paymentsv1.ChargeRequest{AccountId: acctReusedKey, AmountCents: 1000, Currency: "EUR"},
		idempotency.CallResult(&first))
	s.say("   first:  %s", clientResult(resp, err, first))
	resp2, err2 := s.client.Charge(kctx, &paymentsv1.ChargeRequest{AccountId: acctReusedKey, AmountCents: 2500, Currency: "EUR"},
		idempotency.CallResult(&second))
	s.say("   second: %s", clientResult(resp2, err2, second))
	charges := s.ledger.list(acctReusedKey)
	s.check.expect(err == nil, "the first charge was made")
	s.check.expect(status.Code(err2) == codes.FailedPrecondition && idempotency.ReasonOf(err2) == idempotency.ReasonKeyReused && second.Attempts == 1,
		"the second was refused at once: code %s, reason %q", status.Code(err2), idempotency.ReasonOf(err2))
	s.check.expect(len(charges) == 1 && charges[0].GetAmountCents() == 1000,
		"%s was charged once, %s (%s)", acctReusedKey, money(1000, "EUR"), ids(charges))
}

// withoutIdempotency: the lost answer again, with no interceptor at either
// end and a client that retries Unavailable itself, as clients do.
func (s *story) withoutIdempotency(ctx context.Context) {
	s.say("\n4. For contrast: the lost answer without idempotency keys")
	s.say("   The same lost answer, on a server without the idempotency interceptor. The")
	s.say("   client has no interceptor either; it retries Unavailable once by itself.")
	s.faults.loseNextAnswer(acctUnprotected)
	req := &paymentsv1.ChargeRequest{AccountId: acctUnprotected, AmountCents: 1999, Currency: "EUR"}
	var (
		resp *paymentsv1.ChargeResponse
		err  error
	)
	attempts := 0
	for attempts < 2 {
		attempts++
		resp, err = s.plain.Charge(ctx, req)
		if status.Code(err) != codes.Unavailable {
			break
		}
	}
	s.say("   client: %s", clientResult(resp, err, idempotency.CallInfo{Attempts: attempts}))
	charges := s.ledger.list(acctUnprotected)
	s.check.expect(len(charges) == 2, "as expected without idempotency, %s was charged twice (%s)", acctUnprotected, ids(charges))
}

// showLedger prints the ledger as ListCharges returns it and checks it.
func (s *story) showLedger(ctx context.Context) {
	s.say("\nThe ledger (ListCharges, NO_SIDE_EFFECTS: no key needed, never intercepted)")
	resp, err := s.client.ListCharges(ctx, &paymentsv1.ListChargesRequest{})
	if err != nil {
		s.check.expect(false, "ListCharges failed: %v", err)
		return
	}
	count := map[string]int{}
	for _, c := range resp.GetCharges() {
		count[c.GetAccountId()]++
		s.say("   %-20s %s  %10s  %s", c.GetAccountId(), c.GetId(), money(c.GetAmountCents(), c.GetCurrency()),
			c.GetCreatedAt().AsTime().Format("15:04:05.000"))
	}
	want := map[string]int{acctLostAnswer: 1, acctDoubleClick: 1, acctReusedKey: 1, acctUnprotected: 2}
	ok := len(count) == len(want)
	for a, n := range want {
		ok = ok && count[a] == n
	}
	s.check.expect(ok, "the ledger holds one charge per protected account and two for %s", acctUnprotected)
}

func (s *story) clientSays(resp *paymentsv1.ChargeResponse, err error, info idempotency.CallInfo) {
	s.say("   client: %s", clientResult(resp, err, info))
}

// clientResult describes a Charge as the client saw it.
func clientResult(resp *paymentsv1.ChargeResponse, err error, info idempotency.CallInfo) string {
	attempts := fmt.Sprintf("%d attempt", info.Attempts)
	if info.Attempts != 1 {
		attempts += "s"
	}
	if info.Key != "" {
		attempts += fmt.Sprintf(", replayed=%t, key %s", info.Replayed, info.Key)
	}
	if err != nil {
		st := status.Convert(err)
		reason := idempotency.ReasonOf(err)
		if reason == "" {
			reason = "-"
		}
		return fmt.Sprintf("refused: code %s, reason %s (%s)", st.Code(), reason, attempts)
	}
	c := resp.GetCharge()
	return fmt.Sprintf("charge %s, %s (%s)", c.GetId(), money(c.GetAmountCents(), c.GetCurrency()), attempts)
}

func ids(charges []*paymentsv1.Charge) string {
	if len(charges) == 0 {
		return "no charge"
	}
	var s []string
	for _, c := range charges {
		s = append(s, c.GetId())
	}
	return strings.Join(s, ", ")
}

// checker records the story's expectations.
type checker struct {
	w      io.Writer
	n      int
	failed []string
}

func (c *checker) expect(ok bool, format string, args ...any) {
	c.n++
	msg := fmt.Sprintf(format, args...)
	if ok {
		fmt.Fprintf(c.w, "   [ok] %s\n", msg)
		return
	}
	fmt.Fprintf(c.w, "   [FAILED] %s\n", msg)
	c.failed = append(c.failed, msg)
}

// startServer serves cfg on a loopback port; stop stops it and waits.
func startServer(cfg serverConfig) (addr string, stop func(), err error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := newServer(cfg, newProtocol(cfg))
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	return lis.Addr().String(), func() { srv.Stop(); <-done }, nil
}

func dial(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	return conn, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// syncWriter serializes writes: the servers log from their own goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
