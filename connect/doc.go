// Package idempotencyconnect carries the idempotency guarantee of the core
// module to connect-go handlers, over all three of its protocols (Connect,
// gRPC and gRPC-Web, on HTTP/1.1 and HTTP/2): the handler runs once per
// key, and repeats get the stored answer, marked as a replay.
//
// It is an adapter over [idempotency.Protocol], as the core's gRPC
// interceptor is, so both keep one wire contract and one record format: a
// record stored by a grpc-go server replays through a connect-go handler
// and the other way round, and one Protocol can serve both at once.
//
//	p := idempotency.NewProtocol(idempotency.NewRedisStore(rdb),
//		idempotency.WithTTL(24*time.Hour))
//	mux := http.NewServeMux()
//	mux.Handle(paymentsv1connect.NewPaymentsServiceHandler(svc,
//		connect.WithInterceptors(idempotencyconnect.NewInterceptor(p))))
//	grpcServer := grpc.NewServer(grpc.UnaryInterceptor(p.UnaryServerInterceptor()))
//
// The key travels in the request header Idempotency-Key (or the one set
// with idempotency.WithKeyHeader). On the Connect protocol, HTTP's own, it
// is the IETF draft's header: a structured-field string ("order-42",
// quotes included) or bare (order-42). On gRPC and gRPC-Web it is
// metadata, taken as it is (one value), exactly as the gRPC interceptor
// takes it, so a gRPC client's key means the same whether grpc-go or
// connect-go serves it. A method whose Spec declares
// IdempotencyNoSideEffects or IdempotencyIdempotent (connect-go's generated
// code copies the proto's idempotency_level) ignores keys, as on gRPC,
// unless its proto declares (idempotency.v1.method).key_required.
//
// Answers, on every protocol (the Connect protocol's HTTP status follows
// from the code, as connect-go maps it):
//
//	situation                                 code                 ErrorInfo.reason
//	first call                                the handler's own
//	repeat after completion                   the stored one; header
//	                                          Idempotency-Replayed: true
//	method requires a key, none sent          InvalidArgument      KEY_REQUIRED
//	malformed or invalid key                  InvalidArgument      KEY_INVALID
//	same key, different request               FailedPrecondition   KEY_REUSED
//	first call with the key still running     Aborted              KEY_IN_PROGRESS,
//	                                          (HTTP 409 on Connect) with RetryInfo
//	store unreachable                         Unavailable          STORE_UNAVAILABLE
//
// The google.rpc.ErrorInfo (domain idempotency.ErrorDomain) and RetryInfo
// travel as Connect error details: connect.Error.Details, or
// idempotency.ReasonOf and idempotency.RetryDelayOf on the error converted
// with status.FromError on gRPC clients.
//
// A replay carries the stored response, error (code, message, details),
// header and trailer; a stored error's header and trailer come back in
// its connect.Error metadata. Binary ("-bin") headers are stored decoded,
// so they replay the same through either transport.
//
// A replayed response is a connect.Response whose Msg is not the method's
// Go type: connect-go cannot build a *connect.Response[T] for a type known
// only at run time. Its Any() is a proto.Message that encodes as the stored
// message, which is all that connect-go's handlers and codecs need.
// Interceptors installed outside this one must not assert the concrete
// type on Any(); the concrete message of any response, replayed or not, is
//
//	resp.Any().(proto.Message).ProtoReflect().Interface()
//
// On the client side, [NewClientInterceptor] gives connect-go clients what
// the core's gRPC client interceptor gives grpc-go ones: one key per
// logical call, and retries with that key after a lost answer or an
// in-progress one, within the caller's deadline. It is that interceptor,
// run over connect-go, with options of the same names:
//
//	client := paymentsv1connect.NewPaymentsServiceClient(http.DefaultClient, url,
//		connect.WithInterceptors(idempotencyconnect.NewClientInterceptor()))
package idempotencyconnect
