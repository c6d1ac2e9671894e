// The protocol without a transport: what a transport adapter (the gRPC
// interceptor, the connect module's interceptor) hands it, and what it asks
// of the adapter.

package idempotency

import (
	"context"
	"time"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Protocol is the server side of the idempotency protocol, free of any
// transport: claim the key, run the handler once as its owner and store the
// outcome, or answer a repeat from the stored record. The gRPC interceptor
// ([UnaryServerInterceptor], [Protocol.UnaryServerInterceptor]) and the
// connect module's interceptor are adapters over it, so they share one
// record format: an outcome stored through one transport replays through
// the other.
//
// One Protocol may serve several transports at once (a grpc-go server and a
// connect-go handler over the same store): they then share its lease
// renewer, local cache and coalescing. A Protocol is safe for concurrent
// use.
type Protocol struct {
	s *server
}

// NewProtocol returns the protocol over store, configured by opts (the
// options of [UnaryServerInterceptor]). Panics if store is nil.
func NewProtocol(store Store, opts ...Option) *Protocol {
	if store == nil {
		badOption("NewProtocol", "nil", "a Store is required")
	}
	return &Protocol{s: newServer(store, opts)}
}

// UnaryServerInterceptor returns the gRPC adapter over p: the interceptor
// [UnaryServerInterceptor] returns, sharing p's state.
func (p *Protocol) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return p.s.intercept
}

// Call is one unary call, as a transport adapter hands it to
// [Protocol.Handle].
type Call struct {
	// Method is the full method name, "/package.Service/Method": the same
	// name on every transport, so records are shared between them.
	Method string
	// Request is the request message, which the fingerprint and
	// [WithKeyField] read.
	Request any
	// Idempotent reports that the transport declares the method free of
	// side effects or idempotent (connect-go's Spec.IdempotencyLevel). Such
	// a method ignores keys, as one whose proto declares idempotency_level
	// does, unless it declares (idempotency.v1.method).key_required.
	// [WithKeyPolicy] sees the result as the declared policy.
	Idempotent bool
	// HTTPKeyHeader reports that the key header is the IETF draft's
	// Idempotency-Key HTTP header, read with [ParseKeyHeader] (a
	// structured-field string or a bare value), as on HTTP's own protocols
	// (Connect). Otherwise the header is metadata, read as the gRPC
	// interceptor reads it: exactly one value, taken as it is, and not in
	// its binary ("-bin") variant.
	HTTPKeyHeader bool
}

// Exchange is the transport's side of one call: what [Protocol.Handle]
// asks of the adapter. Implementations live in transport adapters; the
// gRPC one is in this package, the Connect one in the connect module.
type Exchange interface {
	// RequestHeader returns the values the client sent for the request
	// header (metadata key) name, which is lower case.
	RequestHeader(name string) []string

	// Run runs the handler with ctx and reports its outcome. owner is true
	// when the call runs as the key's owner: the Result must then report
	// the header and trailer the handler sent, and its Message. Whether or
	// not owner, the handler must not be able to send the header
	// [ReplayedHeader]: the marker is the protocol's alone.
	Run(ctx context.Context, owner bool) Result

	// Replay answers the call from a stored outcome, in the transport's
	// form. The protocol returns what Replay returns as is.
	Replay(ctx context.Context, s Stored) (any, error)

	// Refuse converts an error of the protocol (a gRPC status error with a
	// google.rpc.ErrorInfo of domain [ErrorDomain]) to the transport's form.
	Refuse(err error) error
}

// Result is a handler's outcome, as [Exchange.Run] reports it.
type Result struct {
	// Response and Err are the transport's own answer, which
	// [Protocol.Handle] returns as is when the call is not refused.
	Response any
	Err      error

	// Status is what the client receives: OK, or the error's code, message
	// and details. nil stands for the status of Err as grpc-go would send
	// it (OK for a nil Err).
	Status *status.Status

	// Message is the response message to store when Status is OK: nil when
	// the response is not a protobuf message, which is then not stored.
	// Set only for an owner.
	Message proto.Message

	// Header and Trailer are the metadata the handler sent, keys in lower
	// case, values of "-bin" keys as raw bytes. Set only for an owner.
	Header, Trailer metadata.MD
}

// Stored is a stored outcome, as [Exchange.Replay] receives it.
type Stored struct {
	// Response is the stored response, nil unless Status is OK.
	Response proto.Message
	// Status is the stored status: OK, or the error the first call
	// returned.
	Status *status.Status
	// Header is the stored header with [ReplayedHeader] "true" added;
	// Trailer the stored trailer. Keys in lower case, values of "-bin" keys
	// as raw bytes.
	Header, Trailer metadata.MD
}

// Handle runs one unary call through the protocol: it returns the
// handler's own answer (Result.Response and Result.Err) when the call runs
// or passes through, what [Exchange.Replay] returns for a repeat, and
// [Exchange.Refuse]'s form of the protocol's error otherwise.
func (p *Protocol) Handle(ctx context.Context, in Call, x Exchange) (any, error) {
	c := &call{method: in.Method, idempotent: in.Idempotent, httpKey: in.HTTPKeyHeader, x: x, ev: Event{Method: in.Method}}
	return p.s.handle(ctx, c, in.Request)
}

// newServer is the protocol's state.
func newServer(store Store, opts []Option) *server {
	s := &server{store: store, o: evaluateOptions(opts)}
	s.txs, _ = store.(TxStore)
	s.renewer = newRenewer(store, s.o.lease, s.o.renewHook, s.o.leaseClock)
	s.policies.override = s.o.policy
	if s.o.localCacheSize > 0 {
		s.cache = newLocalCache(s.o.localCacheSize, s.o.localCacheAge)
	}
	if s.o.coalesce {
		s.flights = &flights{m: make(map[string]*flight)}
	}
	return s
}

type server struct {
	store    Store
	txs      TxStore // store, when it is one
	renewer  *renewer
	o        *options
	policies policyCache
	cache    *localCache // nil unless WithLocalCache
	flights  *flights    // nil unless WithCoalescing
}

// call is the state of one call through the protocol.
type call struct {
	method     string
	idempotent bool
	httpKey    bool // Call.HTTPKeyHeader
	// ran is set once the owner's handler returned (execute).
	ran      bool
	x        Exchange
	key      string
	storeKey string
	fp       []byte
	token    string
	// fence is the claim's fencing token (0: the store gave none).
	fence uint64
	// inProgress is the encoded in-progress record the call claims with.
	inProgress []byte
	// claimSent is when the claim that won the key was sent, on the
	// renewer's clock: its lease runs from no earlier than that.
	claimSent time.Time
	// ex is the claim's Execution when the store is a TxStore.
	ex Execution
	ev Event
	// final is the completed record the call ended with (executed or
	// replayed), shared with the local cache and coalesced duplicates.
	final *idempotencyv1.Record
}

// finalStatus returns what the client receives: r.Status, or the status of
// r.Err when the adapter left it unset (nil, which is OK, for no error).
func (r *Result) finalStatus() *status.Status {
	if r.Status != nil || r.Err == nil {
		return r.Status
	}
	return handlerStatus(r.Err)
}

// okStatus is the status of a replayed response (OK, no message).
var okStatus = status.New(codes.OK, "")
