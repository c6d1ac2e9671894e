// Work that is not an RPC, run once per key: a message from a queue, a
// webhook delivery, a scheduled job.

package idempotency

import (
	"context"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// Do runs fn at most once per key through p, as the interceptors run a
// handler: for work that arrives without an RPC and may arrive again, such
// as a queue consumer's message (redelivered after a crash, or claimed by
// another consumer), a webhook the sender retries, or a scheduled job that
// two schedulers start.
//
// name names the work: it is the "method" of the protocol, so it appears
// as [Event.Method] in events, logs and metrics, is passed to the
// fingerprint function ([WithFingerprint]) and is part of the store key.
// Keys are therefore per name: the same key under two names is two keys.
// Use one constant name per kind of work ("billing.ChargeOrder"), never one
// built from the message. A name that is a gRPC full method name
// ("/pkg.Service/Method") shares that method's records: a message and an
// RPC that carry the same key (and, with [WithScope], the same scope) then
// run once between them.
//
// key is the idempotency key, validated as [ValidateKey] does: a message's
// stable identifier, a webhook's delivery id, a job's run date. req is the
// request the key stands for; its fingerprint binds the key to it.
//
// The protocol is the interceptors': the first Do with a key claims it and
// runs fn under a lease renewed while fn runs, then stores fn's outcome (its
// response, or its error when the error's code is stored, see
// [WithStoredCodes]); a transient error, or a panic (which propagates),
// releases the key so that the next delivery runs fn again. fn's context
// carries the key ([KeyFromContext]), the owner's fence
// ([FenceFromContext]: a write fenced on it refuses a run whose lease ran
// out while a redelivery took the key over) and, when p's store is a [TxStore], the
// transaction fn's writes must use (e.g. the postgres module's Tx(ctx)):
// they commit together with the outcome, or not at all. Every option of p
// applies, except those that find the key and decide whether a call needs
// one ([WithKeyHeader], [WithKeyField], [WithKeyPolicy]): Do always has a
// key and always protects fn. [WithScope]'s function is called with ctx.
//
// Do returns:
//
//   - fn's own response and error, with replayed false, when fn ran;
//   - the stored outcome, with replayed true, when an earlier Do with key
//     completed: the stored response, or the stored error as a gRPC status
//     error with the code, message and details fn's error had
//     ([status.FromError] reads it back; the error value itself, and what
//     errors.Is would find in it, is not stored);
//   - the protocol's refusal, with fn not run, as the gRPC status error
//     with a google.rpc.ErrorInfo of domain [ErrorDomain] that the gRPC
//     interceptor would return: read it with [ReasonOf] and, for
//     [ReasonInProgress], [RetryDelayOf]. The ones a caller meets are
//     [ReasonKeyReused] (key already bound to a different req: a new message
//     that must not reuse the key), [ReasonInProgress] (another Do with key
//     is running: try again later, or set [WithWaitForInProgress]),
//     [ReasonStoreUnavailable] (fn did not run: try again), and, with a
//     TxStore, [ReasonNotCommitted] (fn ran but nothing it wrote was kept:
//     try again).
//
// A queue consumer acknowledges a message when Do returned a response or an
// error whose code is stored ([DefaultStoredCode]): the work is done, or
// failed for good, and a redelivery would get the same answer. It leaves the
// message for redelivery otherwise.
//
// fn must return a non-nil response or an error: a nil response with a nil
// error has nothing to store, so its key is released (see
// [OutcomeNotStored]; with a TxStore its writes are rolled back and Do
// returns Internal). A nil p, an empty name or a nil fn returns an Internal
// error (reason [ReasonInternal]) and runs nothing.
func Do[Resp proto.Message](ctx context.Context, p *Protocol, name, key string, req proto.Message, fn func(ctx context.Context) (Resp, error)) (resp Resp, replayed bool, err error) {
	switch {
	case p == nil:
		return resp, false, errDoMisuse(name, "a nil *Protocol")
	case name == "":
		return resp, false, errDoMisuse(name, "an empty work name")
	case fn == nil:
		return resp, false, errDoMisuse(name, "a nil function")
	}
	x := &doExchange[Resp]{name: name, fn: fn}
	c := &call{method: name, x: x, ev: Event{Method: name}}
	s := p.s
	var out any
	if kerr := ValidateKey(key); kerr != nil {
		err = s.fail(ctx, c, OutcomeKeyInvalid, errKeyInvalid(name, "key", kerr), nil)
	} else {
		c.key = key
		out, err = s.handle(ctx, c, req)
	}
	resp, _ = out.(Resp)
	return resp, x.replayed, err
}

func errDoMisuse(name, what string) error {
	return newStatus(codes.Internal, ReasonInternal, methodMeta(name), "Do was called with "+what+"; nothing ran")
}

// doExchange is Do's transport: the request header is never read (the key
// is given), the handler is fn, a replay is the stored response as Resp or
// the stored status as an error, and the protocol's refusals are its gRPC
// status errors as they are.
type doExchange[Resp proto.Message] struct {
	name     string
	fn       func(context.Context) (Resp, error)
	replayed bool
}

func (x *doExchange[Resp]) RequestHeader(string) []string { return nil }

func (x *doExchange[Resp]) Run(ctx context.Context, owner bool) Result {
	resp, err := x.fn(ctx)
	r := Result{Response: resp, Err: err}
	if owner && err == nil {
		// A nil response (typed or not) is not a message to store.
		if m := proto.Message(resp); m != nil && m.ProtoReflect().IsValid() {
			r.Message = m
		}
	}
	return r
}

func (x *doExchange[Resp]) Replay(_ context.Context, s Stored) (any, error) {
	if err := s.Status.Err(); err != nil {
		x.replayed = true
		return nil, err
	}
	resp, ok := s.Response.(Resp)
	if !ok {
		return nil, newStatus(codes.DataLoss, ReasonRecordCorrupt, methodMeta(x.name),
			fmt.Sprintf("the stored response is a %T, Do wants a %T; the work was not run", s.Response, resp))
	}
	x.replayed = true
	return resp, nil
}

func (x *doExchange[Resp]) Refuse(err error) error { return err }
