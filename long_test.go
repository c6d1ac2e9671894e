package idempotency

import (
	"os"
	"testing"
)

// longEnv is the switch for the long proofs: the storms over several
// servers with outages and faults, Redis killed mid-storm, the fault-proxy
// sweeps, Sentinel failover, replicated servers made to lag. `go test work`
// skips them to answer in under a minute; `.ci/run` sets it and runs them
// all (README, Development).
const longEnv = "IDEMPOTENCY_LONG"

// skipUnlessLong skips t unless IDEMPOTENCY_LONG is set.
func skipUnlessLong(t testing.TB) {
	t.Helper()
	if os.Getenv(longEnv) == "" {
		t.Skip("a long proof: set IDEMPOTENCY_LONG=1 to run it (CI does)")
	}
}
