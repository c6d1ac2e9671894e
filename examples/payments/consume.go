package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/idempotency-grpc/idempotency"
	paymentsv1 "github.com/idempotency-grpc/idempotency/proto/payments/v1"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/status"
)

// chargeWork names the consumer's charges for idempotency.Do: in events,
// logs and metrics, and in the store key. It is not the Charge RPC's name,
// so a message's key and a gRPC call's key are separate keys.
const chargeWork = "payments.consume.Charge"

// The fields of a charge message (XADD charges * account_id acct_1
// amount_cents 1999 currency EUR [idempotency_key order-42]).
const (
	fieldAccount  = "account_id"
	fieldAmount   = "amount_cents"
	fieldCurrency = "currency"
	fieldKey      = "idempotency_key"
)

func consumeCommand(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("consume", "consume --redis ADDRS [--stream charges] [--group payments] [--consumer NAME] [--claim-idle 30s] [--postgres DSN] [--lease DURATION] [--latency DURATION] [--quiet]", stderr)
	redisAddrs := fs.String("redis", "", "Redis `ADDRS` holding the stream (required): host:port, or a comma-separated list of Redis Cluster nodes; it also holds the idempotency records unless --postgres is given")
	stream := fs.String("stream", "charges", "the `stream` to consume")
	group := fs.String("group", "payments", "the consumer `group` (created at the start of the stream if missing)")
	consumer := fs.String("consumer", "", "this consumer's `name` in the group (default: host-pid)")
	claimIdle := fs.Duration("claim-idle", 30*time.Second, "claim (XAUTOCLAIM) other consumers' messages left unacknowledged for longer than this `duration`: their consumer died")
	pgDSN := fs.String("postgres", "", "keep the charges in the `DSN`'s charges table and the idempotency records in its idempotency_records table, each charge committed with its outcome")
	lease := fs.Duration("lease", 0, "the idempotency lease of a running charge (default 30s)")
	latency := fs.Duration("latency", 0, "how long each real charge takes, like a slow payment provider (e.g. 2s)")
	chaosKill := fs.Float64("chaos-kill", 0, "for crash tests: the `probability` that the process SIGKILLs itself at each of three points of a charge (before its write, after it, and after its outcome is stored but before the XACK)")
	quiet := fs.Bool("quiet", false, "log no line per message")
	if err := parse(fs, args); err != nil {
		return err
	}
	addrs := splitAddrs(*redisAddrs)
	switch {
	case len(addrs) == 0:
		fmt.Fprintln(stderr, "consume needs --redis: the stream lives in Redis")
		fs.Usage()
		return errUsage
	case *claimIdle < time.Millisecond:
		return fmt.Errorf("--claim-idle %v: want at least 1ms", *claimIdle)
	case *lease < 0 || (*lease > 0 && *lease < time.Millisecond):
		return fmt.Errorf("--lease %v: want at least 1ms", *lease)
	case *chaosKill < 0 || *chaosKill >= 1:
		return fmt.Errorf("--chaos-kill %v: want a probability in [0, 1)", *chaosKill)
	}
	if *consumer == "" {
		host, _ := os.Hostname()
		*consumer = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	logger := log.New(stderr, "", log.LstdFlags)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	led := newLedger(*latency)
	if *chaosKill > 0 {
		led.chaos = &chaos{rate: *chaosKill, logf: logger.Printf}
	}
	var store idempotency.Store
	var storeDesc string
	if *pgDSN != "" {
		book, err := openBook(ctx, *pgDSN)
		if err != nil {
			return err
		}
		defer book.pool.Close()
		led.book = book
		if store, err = openPostgresStore(ctx, book.pool, logger.Printf); err != nil {
			return err
		}
		storeDesc = "Postgres (each charge and its outcome commit in one transaction)"
	} else {
		rs, err := openStore(ctx, *redisAddrs)
		if err != nil {
			return err
		}
		defer rs.close()
		store, storeDesc = rs, rs.desc+"; charges in memory"
	}
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: addrs, ContextTimeoutEnabled: true})
	defer rdb.Close()

	cfg := serverConfig{
		ledger:   led,
		store:    store,
		opts:     []idempotency.Option{idempotency.WithLogger(slog.New(slog.NewTextHandler(logger.Writer(), nil)))},
		logLine:  func(line string) { logger.Print(line) },
		detailed: true,
	}
	if *lease > 0 {
		cfg.opts = append(cfg.opts, idempotency.WithLease(*lease))
	}
	if *quiet {
		cfg.logLine = nil
	}
	c := newStreamConsumer(rdb, *stream, *group, *consumer, *claimIdle, cfg, logger.Printf)
	logger.Printf("consuming stream %q as %q in group %q; idempotency store: %s; claiming messages idle for over %v",
		*stream, *consumer, *group, storeDesc, *claimIdle)
	logger.Printf(`try: redis-cli XADD %s '*' %s acct_1 %s 1999 %s EUR %s order-42`, *stream, fieldAccount, fieldAmount, fieldCurrency, fieldKey)
	err := c.run(ctx)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		logger.Print("stopped")
		return nil
	}
	return err
}

func splitAddrs(addrs string) []string {
	var list []string
	for _, a := range strings.Split(addrs, ",") {
		if a = strings.TrimSpace(a); a != "" {
			list = append(list, a)
		}
	}
	return list
}

// streamConsumer charges one message of a Redis stream at a time, as a
// member of a consumer group, once per message's idempotency key however
// often the message is delivered: after its consumer died before
// acknowledging it (another consumer claims it with XAUTOCLAIM, or the same
// one reads its own pending messages on restart), or when a producer's
// retried XADD wrote it twice.
type streamConsumer struct {
	rdb                 redis.UniversalClient
	stream, group, name string
	claimIdle           time.Duration
	p                   *idempotency.Protocol
	cfg                 serverConfig
	led                 *ledger
	logf                func(format string, args ...any)
}

// newStreamConsumer returns the consumer name of group on stream, which
// charges in cfg.ledger through the idempotency protocol of cfg.
func newStreamConsumer(rdb redis.UniversalClient, stream, group, name string, claimIdle time.Duration, cfg serverConfig, logf func(format string, args ...any)) *streamConsumer {
	return &streamConsumer{
		rdb: rdb, stream: stream, group: group, name: name, claimIdle: claimIdle,
		p: newProtocol(cfg), cfg: cfg, led: cfg.ledger, logf: logf,
	}
}

// batch is how many messages a read or a claim takes at a time.
const batch = 10

// run consumes until ctx ends: first its own pending messages (delivered
// to this name before a restart, never acknowledged), then, in turn, the
// messages other consumers left idle for over claimIdle, and new ones.
func (c *streamConsumer) run(ctx context.Context) error {
	err := c.rdb.XGroupCreateMkStream(ctx, c.stream, c.group, "0").Err()
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		return fmt.Errorf("creating the consumer group: %w", err)
	}
	for {
		msgs, err := c.read(ctx, "0", 0)
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			break
		}
		c.logf("%d message(s) of mine pending since before a restart", len(msgs))
		c.handleAll(ctx, msgs)
	}
	block := min(time.Second, c.claimIdle/2)
	cursor := "0-0"
	for ctx.Err() == nil {
		claimed, next, err := c.rdb.XAutoClaim(ctx, &redis.XAutoClaimArgs{
			Stream: c.stream, Group: c.group, Consumer: c.name, MinIdle: c.claimIdle, Start: cursor, Count: batch,
		}).Result()
		if err != nil {
			return fmt.Errorf("XAUTOCLAIM: %w", err)
		}
		cursor = next
		if len(claimed) > 0 {
			c.logf("claimed %d message(s) pending for over %v with other consumers", len(claimed), c.claimIdle)
			c.handleAll(ctx, claimed)
		}
		msgs, err := c.read(ctx, ">", block)
		if err != nil {
			return err
		}
		c.handleAll(ctx, msgs)
	}
	return ctx.Err()
}

// read reads up to batch messages of the group: new ones (id ">"), or this
// consumer's own pending ones (id "0").
func (c *streamConsumer) read(ctx context.Context, id string, block time.Duration) ([]redis.XMessage, error) {
	args := &redis.XReadGroupArgs{Group: c.group, Consumer: c.name, Streams: []string{c.stream, id}, Count: batch, Block: block}
	if block == 0 {
		args.Block = -1 // no BLOCK argument: return at once
	}
	streams, err := c.rdb.XReadGroup(ctx, args).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("XREADGROUP: %w", err)
	}
	var msgs []redis.XMessage
	for _, s := range streams {
		msgs = append(msgs, s.Messages...)
	}
	return msgs, nil
}

// handleAll handles msgs in order. A message already started is finished
// even when ctx ends: stopping waits for it rather than abandon a charge.
func (c *streamConsumer) handleAll(ctx context.Context, msgs []redis.XMessage) {
	for _, m := range msgs {
		if ctx.Err() != nil {
			return
		}
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		c.handle(hctx, m)
		cancel()
	}
}

// handle charges one message through idempotency.Do and acknowledges it
// once its outcome is settled: charged (now or by an earlier delivery), or
// failed for good (an error whose code the protocol stores, such as an
// invalid request or a key reused for another charge). A transient failure
// (the store unreachable, the key in progress with another consumer, a
// commit that did not happen) leaves it pending, to be delivered again.
func (c *streamConsumer) handle(ctx context.Context, m redis.XMessage) {
	req, key, perr := parseCharge(m)
	if perr != nil {
		// It can never be charged: drop it (a real consumer would move it
		// to a dead-letter stream).
		c.logLine(fmt.Sprintf("message %s dropped: %v", m.ID, perr))
		c.ack(ctx, m.ID)
		return
	}
	notes := &callNotes{}
	start := time.Now()
	res, _, err := idempotency.Do(context.WithValue(ctx, callNotesKey{}, notes), c.p, chargeWork, key, req,
		func(ctx context.Context) (*paymentsv1.ChargeResponse, error) { return c.led.Charge(ctx, req) })
	settled := err == nil || idempotency.DefaultStoredCode(status.Code(err))
	line := callLine(c.cfg, "message "+m.ID, []string{key}, notes, res, err, time.Since(start))
	if !settled {
		c.logLine(line + "; left pending, to be delivered again")
		return
	}
	c.ack(ctx, m.ID)
	c.logLine(line + "; acknowledged")
}

func (c *streamConsumer) ack(ctx context.Context, id string) {
	if err := c.rdb.XAck(ctx, c.stream, c.group, id).Err(); err != nil {
		// The message stays pending and is delivered again: its charge
		// is then replayed, not made twice.
		c.logf("%s: XACK failed: %v", id, err)
	}
}

func (c *streamConsumer) logLine(line string) {
	if c.cfg.logLine != nil {
		c.cfg.logLine(line)
	}
}

// parseCharge reads a charge message: the ChargeRequest and its
// idempotency key, the message's idempotency_key field or, without one,
// the message's id (which is stable across redeliveries, but not across a
// producer's retried XADD).
func parseCharge(m redis.XMessage) (*paymentsv1.ChargeRequest, string, error) {
	if len(m.Values) == 0 {
		return nil, "", errors.New("the entry was deleted from the stream")
	}
	field := func(name string) string { s, _ := m.Values[name].(string); return s }
	amount, err := strconv.ParseInt(field(fieldAmount), 10, 64)
	if err != nil {
		return nil, "", fmt.Errorf("%s %q is not a number of cents", fieldAmount, field(fieldAmount))
	}
	key := field(fieldKey)
	if key == "" {
		key = m.ID
	}
	if err := idempotency.ValidateKey(key); err != nil {
		return nil, "", err
	}
	return &paymentsv1.ChargeRequest{AccountId: field(fieldAccount), AmountCents: amount, Currency: field(fieldCurrency)}, key, nil
}
