package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/grpc/codes"
)

const chargeMethod = "/payments.v1.PaymentsService/Charge"

// recordFlags are the flags of inspect and forget: which record, and where.
type recordFlags struct {
	fs                        *flag.FlagSet
	redis, method, scope, key *string
	timeout                   *time.Duration
}

func newRecordFlags(cmd, what string, stderr io.Writer) *recordFlags {
	fs := newFlagSet(cmd, cmd+" --redis ADDRS --key K [--method "+chargeMethod+"] [--scope S]\n\n"+what, stderr)
	return &recordFlags{
		fs:      fs,
		redis:   fs.String("redis", "", "Redis `ADDRS` holding the records: host:port, or a comma-separated list of Redis Cluster nodes (required; \"payments serve\" logs the address of its embedded Redis)"),
		method:  fs.String("method", chargeMethod, "full gRPC `method` the key was sent to (the leading / may be left out)"),
		scope:   fs.String("scope", "", "`scope` of the key, when the server sets idempotency.WithScope (this example's server does not)"),
		key:     fs.String("key", "", "the idempotency `key` the client sent (required)"),
		timeout: fs.Duration("timeout", 10*time.Second, "deadline of the command"),
	}
}

// open parses args and connects to the store, under the command's
// deadline; done releases both.
func (f *recordFlags) open(ctx context.Context, args []string) (context.Context, *redisStore, func(), error) {
	if err := f.parse(args); err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, *f.timeout)
	store, err := openStore(ctx, *f.redis)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return ctx, store, func() { store.close(); cancel() }, nil
}

// parse parses args and checks the required flags.
func (f *recordFlags) parse(args []string) error {
	if err := parse(f.fs, args); err != nil {
		return err
	}
	var problem string
	switch {
	case strings.TrimSpace(*f.redis) == "":
		problem = "--redis is required: the records live in Redis, not in the serve process. " +
			"\"payments serve\" without --redis logs the address of its embedded Redis " +
			"(\"embedded Redis at 127.0.0.1:PORT\"), usable while it runs"
	case *f.key == "":
		problem = "--key is required"
	default:
		if err := idempotency.ValidateKey(*f.key); err != nil {
			problem = fmt.Sprintf("--key %q cannot have a record: the server refuses it (%v)", *f.key, err)
		}
	}
	if problem != "" {
		fmt.Fprintf(f.fs.Output(), "%s\n\n", problem)
		f.fs.Usage()
		return errUsage
	}
	if !strings.HasPrefix(*f.method, "/") { // as grpcurl writes it
		*f.method = "/" + *f.method
	}
	return nil
}

// describe names the record in messages.
func (f *recordFlags) describe() string {
	s := fmt.Sprintf("key %q on %s", *f.key, *f.method)
	if *f.scope != "" {
		s += fmt.Sprintf(" in scope %q", *f.scope)
	}
	return s
}

func (f *recordFlags) noRecord() error {
	return fmt.Errorf("no record for %s: the key was never used, has expired, was released after a transient error, or was forgotten", f.describe())
}

func inspectCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newRecordFlags("inspect", "Shows the record the idempotency interceptor keeps for a key (never the stored response\nitself). Exits 1 when there is none.", stderr)
	ctx, store, done, err := f.open(ctx, args)
	if err != nil {
		return err
	}
	defer done()
	info, err := idempotency.Lookup(ctx, store, *f.method, *f.scope, *f.key)
	if errors.Is(err, idempotency.ErrNoRecord) {
		return f.noRecord()
	}
	if err != nil {
		return fmt.Errorf("looking up %s: %w", f.describe(), err)
	}
	printRecord(stdout, f, store, info, time.Now())
	return nil
}

// printRecord prints what inspect shows of a record, as of now.
func printRecord(w io.Writer, f *recordFlags, store *redisStore, info *idempotency.RecordInfo, now time.Time) {
	fmt.Fprintf(w, "record:    %s\n", f.describe())
	fmt.Fprintf(w, "store:     %s, Redis key %s%s\n", store.desc, idempotency.DefaultKeyPrefix, info.StoreKey)
	fmt.Fprintf(w, "state:     %s\n", info.State)
	fmt.Fprintf(w, "method:    %s\n", info.Method)
	since, what := info.Completed, "completed"
	if info.State == "in_progress" || since.IsZero() {
		since, what = info.Created, "claimed"
	}
	if !since.IsZero() {
		fmt.Fprintf(w, "age:       %s (%s %s)\n", now.Sub(since).Round(time.Millisecond), what, since.UTC().Format(time.RFC3339Nano))
	}
	switch info.State {
	case "in_progress":
		fmt.Fprintf(w, "ttl:       %s (lease left: the key frees itself then, unless the running call renews it)\n", info.TTL.Round(time.Millisecond))
		fmt.Fprintf(w, "code:      - (no outcome yet: the first call is running, or died and its lease has not ended)\n")
	case "too_large":
		fmt.Fprintf(w, "ttl:       %s (retention left)\n", info.TTL.Round(time.Millisecond))
		fmt.Fprintf(w, "code:      %s\n", info.Code)
		fmt.Fprintf(w, "response:  %d bytes, too large to store: repeats are refused\n", info.ResponseSize)
	default:
		fmt.Fprintf(w, "ttl:       %s (retention left)\n", info.TTL.Round(time.Millisecond))
		if info.Code == codes.OK {
			fmt.Fprintf(w, "code:      OK (a stored response: repeats get it back)\n")
		} else {
			fmt.Fprintf(w, "code:      %s (a stored error: repeats get it back)\n", info.Code)
		}
		fmt.Fprintf(w, "response:  %d bytes\n", info.ResponseSize)
	}
}

func forgetCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newRecordFlags("forget", "Deletes the record of a key, so that the next call with it runs the handler again.\nForget an in-progress record only when its call is known to be dead.", stderr)
	ctx, store, done, err := f.open(ctx, args)
	if err != nil {
		return err
	}
	defer done()
	// What is about to be deleted, for the message; a record that cannot
	// be decoded is deleted all the same.
	info, _ := idempotency.Lookup(ctx, store, *f.method, *f.scope, *f.key)
	err = idempotency.Forget(ctx, store, *f.method, *f.scope, *f.key)
	if errors.Is(err, idempotency.ErrNoRecord) {
		return f.noRecord()
	}
	if err != nil {
		return fmt.Errorf("forgetting %s: %w", f.describe(), err)
	}
	was := ""
	if info != nil {
		was = " (it was " + info.State + ")"
	}
	fmt.Fprintf(stdout, "forgot the record of %s%s: the next call with this key runs the handler again\n", f.describe(), was)
	if info != nil && info.State == "in_progress" {
		fmt.Fprintf(stdout, "note: it was in progress; if its call is still running, it will find its lease lost and store nothing\n")
	}
	return nil
}
