// Package idempotency makes gRPC calls that must never happen twice
// (charges, orders, bookings, transfers) safe to retry.
//
// A client sends an idempotency key in the "idempotency-key" request
// metadata. [UnaryServerInterceptor] runs the handler once per key, stores
// its outcome (the response message or error status, with the header and
// trailer metadata the handler set) in a [Store], and answers every repeat
// with the stored outcome, marked with the response header
// "idempotency-replayed: true", without running the handler again.
// [UnaryClientInterceptor] attaches a key to every call that needs one and
// retries with the same key.
//
// # Wire contract
//
//   - A valid key is 1 to 255 bytes of visible ASCII (0x21-0x7E), sent once.
//     Anything else: InvalidArgument, reason KEY_INVALID.
//   - A method that requires a key, called without one: InvalidArgument,
//     reason KEY_REQUIRED. Other methods without a key pass through.
//   - The same key with a different request: FailedPrecondition, reason
//     KEY_REUSED.
//   - A repeat while the first call runs: Aborted, reason KEY_IN_PROGRESS,
//     with a google.rpc.RetryInfo delay (or, with [WithWaitForInProgress],
//     the replay once the first call ends).
//   - The store unreachable: Unavailable, reason STORE_UNAVAILABLE; the
//     handler is not run.
//   - A stored record that cannot be read: DataLoss, reason RECORD_CORRUPT.
//
// Every error the interceptors produce carries a google.rpc.ErrorInfo with
// domain [ErrorDomain]; [ReasonOf] extracts its reason.
//
// # Which methods
//
// The interceptors read the protobuf method descriptors: methods declared
// `option idempotency_level = NO_SIDE_EFFECTS` (or IDEMPOTENT) are left
// alone, and methods declared `option (idempotency.v1.method) =
// {key_required: true}` (proto/idempotency/v1/options.proto) require a key.
// Code options ([WithRequiredKey], [WithIgnoredMethods], [WithKeyPolicy])
// override the declarations.
//
// # Stores
//
// [RedisStore] (Redis standalone, Sentinel or Cluster, through go-redis) is
// the store for a fleet of servers; [MemoryStore] suits tests and single
// processes. A replay costs one Redis round trip and a first execution two.
//
// # Other transports
//
// The protocol itself ([Protocol]) knows no transport: the gRPC interceptor
// is an adapter over it, as is the connect module's interceptor for
// connect-go (Connect, gRPC and gRPC-Web), and both write one record format,
// so a key is one key whichever way calls arrive. REST clients reach the
// gRPC interceptor through grpc-gateway with the gateway module.
//
// # Work that is not an RPC
//
// [Do] runs a function once per key through a [Protocol], for a queue
// consumer's messages, webhook deliveries or scheduled jobs: the same
// lease, fingerprint check, stored outcome and replay, with the refusals
// above as its errors.
package idempotency
