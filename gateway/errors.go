package idempotencygw

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/idempotency-grpc/idempotency"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// httpStatus returns the status the IETF draft gives to an idempotency
// error of the server interceptor (or of the gateway's own header check),
// and the Retry-After value to send with it ("" for none). ok is false for
// every other error, whose status the gateway's mapping decides.
func httpStatus(err error) (code int, retryAfter string, ok bool) {
	switch idempotency.ReasonOf(err) {
	case idempotency.ReasonKeyRequired, idempotency.ReasonKeyInvalid:
		return http.StatusBadRequest, "", true
	case idempotency.ReasonKeyReused:
		return http.StatusUnprocessableEntity, "", true
	case idempotency.ReasonInProgress:
		if d, ok := idempotency.RetryDelayOf(err); ok {
			retryAfter = strconv.FormatInt(retryAfterSeconds(d), 10)
		}
		return http.StatusConflict, retryAfter, true
	}
	return 0, "", false
}

// retryAfterSeconds is d in whole seconds, rounded up, and at least 1: a
// Retry-After of 0 would invite a retry loop against a call still running.
func retryAfterSeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	return max(s, 1)
}

// errorHandler wraps next so that the idempotency errors get the draft's
// status: next writes the response (body, metadata headers) as it would,
// and only the status it picks for the error's code is changed.
func errorHandler(next runtime.ErrorHandlerFunc) runtime.ErrorHandlerFunc {
	return func(ctx context.Context, mux *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
		code, retryAfter, ok := httpStatus(err)
		if !ok {
			next(ctx, mux, m, w, r, err)
			return
		}
		next(ctx, mux, m, &statusWriter{
			ResponseWriter: w,
			from:           runtime.HTTPStatusFromCode(status.Code(err)),
			to:             code,
			retryAfter:     retryAfter,
		}, r, err)
	}
}

// statusWriter replaces the status from with to (and adds Retry-After) when
// the wrapped error handler writes it; a handler that chose another status
// (a marshalling failure, a mapping of its own) keeps it.
type statusWriter struct {
	http.ResponseWriter
	from, to   int
	retryAfter string
	written    bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.written && code == w.from {
		code = w.to
		if w.retryAfter != "" {
			w.Header().Set("Retry-After", w.retryAfter)
		}
	}
	w.written = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.written = true // an implicit 200: the handler's choice
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// errMalformedKeyHeader is the gateway's answer to an Idempotency-Key header
// it cannot pass on: the interceptor's KEY_INVALID error, in the same
// shape (InvalidArgument, ErrorInfo in the idempotency domain).
func errMalformedKeyHeader(cause error) error {
	st := status.New(codes.InvalidArgument, cause.Error()) // "idempotency: invalid idempotency key: malformed Idempotency-Key header: ..."
	if d, err := st.WithDetails(&errdetails.ErrorInfo{
		Reason:   idempotency.ReasonKeyInvalid,
		Domain:   idempotency.ErrorDomain,
		Metadata: map[string]string{"header": KeyHeader},
	}); err == nil {
		st = d
	}
	return st.Err()
}
