package idempotencygw

import (
	"testing"
	"time"
)

// TestRetryAfterSeconds verifies that Retry-After is the delay in whole
// seconds, rounded up, and never 0.
func TestRetryAfterSeconds(t *testing.T) {
	for d, want := range map[time.Duration]int64{
		0:                       1,
		time.Millisecond:        1,
		time.Second:             1,
		time.Second + 1:         2,
		2500 * time.Millisecond: 3,
		time.Minute:             60,
	} {
		if got := retryAfterSeconds(d); got != want {
			t.Errorf("retryAfterSeconds(%v) = %d, want %d", d, got, want)
		}
	}
}
