// Package idempotencygw carries the idempotency guarantee of
// idempotency.UnaryServerInterceptor through grpc-gateway v2 to REST
// clients that send the IETF draft's Idempotency-Key header
// (draft-ietf-httpapi-idempotency-key-header): the handler runs once per
// key, and repeats get the stored answer, marked as a replay.
//
// Wiring is one option on the gateway's mux; the gRPC server keeps its
// interceptor and store as for gRPC clients:
//
//	mux := runtime.NewServeMux(idempotencygw.ServeMuxOption())
//	err := pb.RegisterPaymentsServiceHandlerFromEndpoint(ctx, mux, grpcAddr, dialOpts)
//	http.ListenAndServe(addr, mux)
//
// The key travels in the Idempotency-Key request header as the draft's
// structured-field string, "order-42" with the quotes (\" and \\ escape a
// quote and a backslash), or bare, order-42, as many clients send it. The
// gateway passes the unquoted key to the server in the metadata key
// "idempotency-key" ([WithKeyHeader] to change it), where the interceptor
// validates it as for any gRPC client. The gateway itself refuses only what
// it cannot carry faithfully: a malformed string (no closing quote, another
// escape, anything after the closing quote, parameters included), a byte
// outside printable ASCII (grpc-gateway would drop the header silently and
// the call would run without a key), or several header lines with different
// keys.
//
// Answers: the interceptor's errors keep the gateway's JSON error body (a
// google.rpc.Status whose details hold the google.rpc.ErrorInfo, domain
// idempotency.ErrorDomain) with the draft's statuses:
//
//	situation                                  status  ErrorInfo.reason
//	first call, or a replay after completion   the call's own; a replay has
//	                                           header Idempotency-Replayed: true
//	method requires a key, none sent           400     KEY_REQUIRED
//	malformed header, or a key the server      400     KEY_INVALID
//	refuses (too long, spaces, ...)
//	same key, different request                422     KEY_REUSED
//	first call with the key still running      409     KEY_IN_PROGRESS, with
//	                                           Retry-After (the RetryInfo delay,
//	                                           whole seconds rounded up, >= 1)
//
// Every other error keeps grpc-gateway's mapping (runtime.HTTPStatusFromCode),
// so a replayed stored error has the status it had the first time.
//
// Without this package, grpc-gateway forwards no Idempotency-Key header to
// the server (its default header matcher passes only the permanent HTTP
// headers, as grpcgateway-*), so every REST call would run unprotected.
package idempotencygw
