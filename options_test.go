package idempotency

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
)

// TestOptionsRefuseNonsense verifies that every option given a value it
// cannot honour panics at construction, with a message naming the option
// and the value, instead of silently keeping a default.
func TestOptionsRefuseNonsense(t *testing.T) {
	for _, tc := range []struct {
		option string
		value  string // a fragment of the value as the message prints it
		build  func()
	}{
		{"WithKeyHeader", `""`, func() { WithKeyHeader("") }},
		{"WithKeyHeader", `"idempotency key"`, func() { WithKeyHeader("Idempotency Key") }},
		{"WithKeyHeader", `"grpc-key"`, func() { WithKeyHeader("grpc-key") }},
		{"WithKeyHeader", `"key-bin"`, func() { WithKeyHeader("key-bin") }},
		{"WithKeyField", `""`, func() { WithKeyField("") }},
		{"WithTTL", "0s", func() { WithTTL(0) }},
		{"WithLease", "500µs", func() { WithLease(500 * time.Microsecond) }},
		{"WithRetryDelay", "-1s", func() { WithRetryDelay(-time.Second) }},
		{"WithWaitForInProgress", "0s", func() { WithWaitForInProgress(0) }},
		{"WithMaxRecordSize", "0", func() { WithMaxRecordSize(0) }},
		{"WithCompleteTimeout", "-1ms", func() { WithCompleteTimeout(-time.Millisecond) }},
		{"WithScope", "nil", func() { WithScope(nil) }},
		{"WithFingerprint", "nil", func() { WithFingerprint(nil) }},
		{"WithStoredCodes", "nil", func() { WithStoredCodes(nil) }},
		{"WithKeyPolicy", "nil", func() { WithKeyPolicy(nil) }},
		{"WithRequiredKey", `"Charge"`, func() { WithRequiredKey("Charge") }},
		{"WithIgnoredMethods", `"/pkg.Svc/"`, func() { WithIgnoredMethods("/pkg.Svc/") }},
		{"WithLocalCache", "0", func() { WithLocalCache(0, time.Minute) }},
		{"WithLocalCache", "-1s", func() { WithLocalCache(10, -time.Second) }},
		{"UnaryServerInterceptor", "nil", func() { UnaryServerInterceptor(nil) }},
		{"WithClientKeyHeader", `""`, func() { WithClientKeyHeader("") }},
		{"WithClientKeyHeader", `"x:y"`, func() { WithClientKeyHeader("x:y") }},
		{"WithMaxAttempts", "0", func() { WithMaxAttempts(0) }},
		{"WithBackoff", "-1ms", func() { WithBackoff(-time.Millisecond, time.Second) }},
		{"WithBackoff", "1ms", func() { WithBackoff(time.Second, time.Millisecond) }},
		{"WithPerAttemptTimeout", "-1s", func() { WithPerAttemptTimeout(-time.Second) }},
		{"WithRetryCodes", "OK", func() { WithRetryCodes(codes.Unavailable, codes.OK) }},
		{"WithRetryCodes", "Code(99)", func() { WithRetryCodes(codes.Code(99)) }},
		{"WithClientMethods", "nil", func() { WithClientMethods(nil) }},
		{"WithKeyGenerator", "nil", func() { WithKeyGenerator(nil) }},
	} {
		t.Run(tc.option, func(t *testing.T) {
			var msg string
			func() {
				defer func() { msg, _ = recover().(string) }()
				tc.build()
			}()
			require.NotEmpty(t, msg, "%s with %s did not panic", tc.option, tc.value)
			require.True(t, strings.HasPrefix(msg, "idempotency: "+tc.option+"("), "panic %q does not name the option %s", msg, tc.option)
			require.Contains(t, msg, tc.value, "panic %q does not show the value", msg)
		})
	}
}

// TestOptionsAcceptEdgeValues verifies the documented edge values that are
// valid: they must not panic.
func TestOptionsAcceptEdgeValues(t *testing.T) {
	require.NotPanics(t, func() {
		WithKeyHeader("X-Request-Key") // lower-cased
		WithLease(time.Millisecond)
		WithTTL(time.Millisecond)
		WithRetryDelay(0)
		WithBackoff(0, 0)
		WithPerAttemptTimeout(0)
		WithMaxAttempts(1)
		WithRetryCodes()
		WithLogger(nil)
		WithObserver(nil)
		WithClientObserver(nil)
		WithRequiredKey("/pkg.v1.Service/Method")
	})
	o := evaluateOptions([]Option{nil, WithKeyHeader("X-Request-Key"), nil})
	require.Equal(t, "x-request-key", o.keyHeader, "WithKeyHeader lower-cases")
	co := evaluateClientOptions([]ClientOption{nil, WithClientKeyHeader("X-Request-Key")})
	require.Equal(t, "x-request-key", co.header, "WithClientKeyHeader lower-cases")
	require.NotPanics(t, func() {
		UnaryServerInterceptor(NewMemoryStore(), nil, WithObserver(func(context.Context, Event) {}))
		UnaryClientInterceptor(nil)
	}, "nil options are skipped on both sides")
}
