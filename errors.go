package idempotency

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of every error the
// interceptors produce themselves.
const ErrorDomain = "idempotency.grpc.io"

// Reasons carried in the google.rpc.ErrorInfo of the errors the server
// interceptor produces. They are part of the wire contract: clients may
// branch on them (see [ReasonOf]).
const (
	// ReasonKeyRequired: the method requires an idempotency key and the call
	// had none. Code InvalidArgument.
	ReasonKeyRequired = "KEY_REQUIRED"
	// ReasonKeyInvalid: the key is empty, too long, has bytes outside
	// 0x21-0x7E, was sent more than once or as binary metadata. Code
	// InvalidArgument.
	ReasonKeyInvalid = "KEY_INVALID"
	// ReasonKeyReused: the key is already bound to a different request (the
	// fingerprints differ). Code FailedPrecondition.
	ReasonKeyReused = "KEY_REUSED"
	// ReasonInProgress: the first call with this key is still running. Code
	// Aborted, with a google.rpc.RetryInfo delay.
	ReasonInProgress = "KEY_IN_PROGRESS"
	// ReasonAlreadyProcessed: reject-repeats mode ([WithRejectRepeats]) and the
	// key was already processed; the stored outcome is attached. Code
	// AlreadyExists.
	ReasonAlreadyProcessed = "ALREADY_PROCESSED"
	// ReasonResponseTooLarge: the call was executed but its outcome exceeded
	// [WithMaxRecordSize], so it cannot be replayed. Code AlreadyExists.
	ReasonResponseTooLarge = "RESPONSE_TOO_LARGE"
	// ReasonStoreUnavailable: the store could not be reached or failed, and the
	// handler was not run. Code Unavailable.
	ReasonStoreUnavailable = "STORE_UNAVAILABLE"
	// ReasonNotReplicated: the claim was not acknowledged by as many Redis
	// replicas as [WithReplicaAcks] asks within its timeout, so the key was
	// released and the handler was not run. Code Unavailable; clients retry
	// it like STORE_UNAVAILABLE.
	ReasonNotReplicated = "STORE_NOT_REPLICATED"
	// ReasonNotCommitted: the store is a [TxStore], the handler ran, and its
	// transaction did not commit with the outcome (another call owned the
	// key by then, or the database failed), so nothing the handler wrote in
	// it was kept; or the commit's reply was lost and it is not known which
	// way it went. Code Unavailable; a retry with the same key is safe
	// (it replays the outcome if the commit happened, and runs the call
	// otherwise), and the client interceptor retries it.
	ReasonNotCommitted = "OUTCOME_NOT_COMMITTED"
	// ReasonRecordCorrupt: the stored record could not be decoded or names a
	// response type this server does not know. Code DataLoss.
	ReasonRecordCorrupt = "RECORD_CORRUPT"
	// ReasonScopeFailed: the scope function ([WithScope]) returned an error
	// that was not a gRPC status. Code Internal.
	ReasonScopeFailed = "SCOPE_FAILED"
	// ReasonFingerprintFailed: the request could not be fingerprinted. Code
	// Internal.
	ReasonFingerprintFailed = "FINGERPRINT_FAILED"
	// ReasonInternal: the interceptor failed in a way that is not the
	// caller's fault (e.g. a record could not be encoded). Code Internal.
	ReasonInternal = "INTERNAL_ERROR"
	// ReasonCallEnded: the caller's context ended (canceled, or its deadline
	// passed) before the key could be claimed, or while the call waited for
	// the first call with its key; the handler did not run. Code Canceled or
	// DeadlineExceeded.
	ReasonCallEnded = "CALL_ENDED"
	// ReasonKeyGenerationFailed: the client interceptor's key generator
	// ([WithKeyGenerator]) failed or returned an invalid key; nothing was
	// sent. Code Internal.
	ReasonKeyGenerationFailed = "KEY_GENERATION_FAILED"
	// ReasonRetryInterrupted: the caller's context ended while the client
	// interceptor waited to retry; the message quotes the last attempt's
	// error. Code Canceled or DeadlineExceeded.
	ReasonRetryInterrupted = "RETRY_INTERRUPTED"
)

// Sentinel errors of the package. Store implementations return
// [ErrLeaseLost]; the others wrap the causes the interceptors turn into a
// gRPC status.
var (
	// ErrInvalidKey is wrapped by errors from [ValidateKey].
	ErrInvalidKey = errors.New("idempotency: invalid idempotency key")
	// ErrLeaseLost is returned by [Store.Renew], [Store.Complete] and
	// [Store.Release] when the caller's token no longer owns the key: the lease
	// expired and another call claimed the key, or the key was completed or
	// deleted. Nothing was written.
	ErrLeaseLost = errors.New("idempotency: lease lost")
	// ErrCorruptRecord is wrapped by errors decoding a stored record.
	ErrCorruptRecord = errors.New("idempotency: corrupt record")

	// ErrNotReplicated is wrapped by store errors when fewer replicas than
	// asked acknowledged a write (see [WithReplicaAcks]). A claim so
	// refused is answered Unavailable (reason STORE_NOT_REPLICATED); an
	// outcome write so refused is reported as [OutcomeNotReplicated].
	ErrNotReplicated = errors.New("idempotency: the write was not acknowledged by enough replicas")

	// errForgotten is the Event error of a call whose record was deleted
	// with Forget while its handler ran.
	errForgotten = fmt.Errorf("%w: the record was forgotten (deleted) while the handler ran; its outcome was not written back", ErrLeaseLost)
)

// ReasonOf returns the google.rpc.ErrorInfo reason of err when err is a gRPC
// status produced by this package (domain [ErrorDomain]), and "" otherwise.
func ReasonOf(err error) string {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return ""
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			return info.GetReason()
		}
	}
	return ""
}

// RetryDelayOf returns the google.rpc.RetryInfo delay carried by err, if any.
func RetryDelayOf(err error) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return 0, false
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay() != nil {
			return ri.GetRetryDelay().AsDuration(), true
		}
	}
	return 0, false
}

// newStatus builds the status of an error produced by the interceptor: the
// code, a message, an ErrorInfo with reason and metadata, and extra details.
func newStatus(c codes.Code, reason string, meta map[string]string, msg string, extra ...proto.Message) error {
	st := status.New(c, "idempotency: "+msg)
	details := make([]*anypb.Any, 0, 1+len(extra))
	for _, d := range append([]proto.Message{&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: meta}}, extra...) {
		if a, ok := d.(*anypb.Any); ok {
			details = append(details, a)
			continue
		}
		a, err := anypb.New(d)
		if err != nil {
			return st.Err()
		}
		details = append(details, a)
	}
	p := st.Proto()
	p.Details = details
	return status.FromProto(p).Err()
}

func retryInfo(d time.Duration) *errdetails.RetryInfo {
	return &errdetails.RetryInfo{RetryDelay: durationpb.New(d)}
}

func errKeyRequired(method, header string) error {
	return newStatus(codes.InvalidArgument, ReasonKeyRequired,
		map[string]string{"method": method, "header": header},
		fmt.Sprintf("method %s requires an idempotency key in the %q request metadata", method, header))
}

func errKeyInvalid(method, header string, cause error) error {
	return newStatus(codes.InvalidArgument, ReasonKeyInvalid,
		map[string]string{"method": method, "header": header}, strings.TrimPrefix(cause.Error(), "idempotency: "))
}

// badOption panics with the message every option constructor uses for a
// value it refuses: the option, the value, and why. An option that cannot be
// honoured is a programming error found at startup, never a silent default.
func badOption(option string, value any, why string) {
	panic(fmt.Sprintf("idempotency: %s(%v): %s", option, value, why))
}

// checkHeaderName refuses a metadata key that cannot carry a key: empty, a
// character gRPC does not allow in a key, the reserved "grpc-" prefix, or a
// binary ("-bin") key. name is already lower-cased.
func checkHeaderName(option, name string) {
	if name == "" {
		badOption(option, `""`, "the header name must not be empty: every call would look keyless and pass through unprotected")
	}
	if !metadataKeyChars(name) {
		badOption(option, strconv.Quote(name), "a gRPC metadata key may hold only 0-9 a-z - _ .")
	}
	if strings.HasPrefix(name, "grpc-") {
		badOption(option, strconv.Quote(name), `the "grpc-" prefix is reserved by gRPC`)
	}
	if strings.HasSuffix(name, "-bin") {
		badOption(option, strconv.Quote(name), `a "-bin" key carries binary values; the idempotency key is text`)
	}
}

func methodMeta(method string) map[string]string { return map[string]string{"method": method} }

func errScopeFailed(method string) error {
	return newStatus(codes.Internal, ReasonScopeFailed, methodMeta(method), "cannot determine the caller scope")
}

func errFingerprintFailed(method string) error {
	return newStatus(codes.Internal, ReasonFingerprintFailed, methodMeta(method), "cannot fingerprint the request")
}

func errEncodeRecord(method string) error {
	return newStatus(codes.Internal, ReasonInternal, methodMeta(method), "cannot encode the idempotency record")
}

func errStoreUnavailable(method string) error {
	return newStatus(codes.Unavailable, ReasonStoreUnavailable, methodMeta(method),
		"the idempotency store is unavailable; the call was not executed")
}

func errNotCommitted(method string, unknown bool) error {
	if unknown {
		return newStatus(codes.Unavailable, ReasonNotCommitted, methodMeta(method),
			"the call ran but the reply to its commit was lost: its writes and its outcome either both committed or neither did; retry with the same idempotency key to learn which")
	}
	return newStatus(codes.Unavailable, ReasonNotCommitted, methodMeta(method),
		"the call ran but its transaction did not commit, so nothing it wrote was kept; retry with the same idempotency key")
}

func errInProgress(method string, retryDelay time.Duration) error {
	return newStatus(codes.Aborted, ReasonInProgress, methodMeta(method),
		"a call with this idempotency key is still in progress; retry later", retryInfo(retryDelay))
}

func errKeyReused(method string) error {
	return newStatus(codes.FailedPrecondition, ReasonKeyReused, methodMeta(method),
		"the idempotency key was already used for a different request; use a new key for a new request")
}

func errTooLarge(method string, size int64) error {
	return newStatus(codes.AlreadyExists, ReasonResponseTooLarge,
		map[string]string{"method": method, "response_size": strconv.FormatInt(size, 10)},
		fmt.Sprintf("the call with this idempotency key was executed, but its outcome (%d bytes) was too large to store and cannot be replayed", size))
}

// errAlreadyProcessed carries the stored outcome as a detail: the response
// in an Any of its type, or the stored error as a google.rpc.Status.
func errAlreadyProcessed(method string, outcome proto.Message) error {
	return newStatus(codes.AlreadyExists, ReasonAlreadyProcessed, methodMeta(method),
		"the call with this idempotency key was already processed; its outcome is attached", outcome)
}

func errCorrupt(method string) error {
	return newStatus(codes.DataLoss, ReasonRecordCorrupt, methodMeta(method),
		"the stored record for this idempotency key cannot be read; the call was not executed")
}

// errCallEnded is the answer when the caller's own context ended first: its
// code is the context's (Canceled or DeadlineExceeded), as gRPC would give.
func errCallEnded(method string, ctxErr error) error {
	return newStatus(status.FromContextError(ctxErr).Code(), ReasonCallEnded, methodMeta(method),
		"the call ended ("+ctxErr.Error()+") before the idempotency key could be handled; the handler did not run")
}

func errKeyGeneration(method string, cause error) error {
	return newStatus(codes.Internal, ReasonKeyGenerationFailed, methodMeta(method),
		"generating a key for "+method+": "+strings.TrimPrefix(cause.Error(), "idempotency: "))
}

func errRetryInterrupted(method string, ctxErr error, attempt int, last error) error {
	return newStatus(status.FromContextError(ctxErr).Code(), ReasonRetryInterrupted,
		map[string]string{"method": method, "attempts": strconv.Itoa(attempt)},
		fmt.Sprintf("%v while waiting to retry %s after attempt %d, which failed: %v", ctxErr, method, attempt, last))
}

func errNotReplicated(method string) error {
	return newStatus(codes.Unavailable, ReasonNotReplicated, methodMeta(method),
		"the idempotency store could not replicate the claim; the call was not executed")
}
