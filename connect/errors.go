package idempotencyconnect

import (
	"time"

	"github.com/idempotency-grpc/idempotency"
)

// ReasonOf returns the ErrorInfo reason of an error the interceptor
// produced (idempotency.ReasonKeyReused, ...), as a connect-go client or
// handler sees it, or "" for any other error.
func ReasonOf(err error) string {
	return idempotency.ReasonOf(StatusOf(err).Err())
}

// RetryDelayOf returns the delay the server suggests before retrying an
// error it produced (the RetryInfo of KEY_IN_PROGRESS), as a connect-go
// client sees it.
func RetryDelayOf(err error) (time.Duration, bool) {
	return idempotency.RetryDelayOf(StatusOf(err).Err())
}
