package main

import (
	"os"
	"testing"
)

// skipUnlessLong skips t unless IDEMPOTENCY_LONG is set: the switch for the
// long proofs (storms over several servers, crash storms), which
// `go test work` skips to answer in under a minute and `.ci/run` always
// runs (README, Development).
func skipUnlessLong(t testing.TB) {
	t.Helper()
	if os.Getenv("IDEMPOTENCY_LONG") == "" {
		t.Skip("a long proof: set IDEMPOTENCY_LONG=1 to run it (CI does)")
	}
}
