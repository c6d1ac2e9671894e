package idempotency

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	testingv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/testing/v1"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// memTxStore is a TxStore over MemoryStore whose "business writes" are a
// counter: staged in the Execution, added on a commit that completed the
// key. It drives the interceptor's transactional path without a database,
// and is a second implementation of the public TxStore contract.
type memTxStore struct {
	*MemoryStore
	mu        sync.Mutex
	committed int
	// commitErr, when set, is what the next Commit returns, committing
	// nothing (a failed or unknown commit).
	commitErr error
}

type memExec struct {
	s          *memTxStore
	key, token string
	staged     int
	begun      bool
}

type memTxKey struct{}

func (s *memTxStore) ClaimTx(ctx context.Context, key, token string, record []byte, lease time.Duration) (ClaimResult, Execution, error) {
	res, err := s.Claim(ctx, key, token, record, lease)
	if err != nil || !res.Claimed {
		if err == nil && ownsRecord(res.Record, token) {
			return ClaimResult{Claimed: true}, &memExec{s: s, key: key, token: token}, nil
		}
		return res, nil, err
	}
	return res, &memExec{s: s, key: key, token: token}, nil
}

func (e *memExec) Begin(ctx context.Context) (context.Context, error) {
	e.begun = true
	return context.WithValue(ctx, memTxKey{}, e), nil
}

// write stages one business write in the call's transaction.
func memWrite(ctx context.Context) error {
	e, ok := ctx.Value(memTxKey{}).(*memExec)
	if !ok {
		return errors.New("no transaction in the context")
	}
	e.staged++
	return nil
}

func (e *memExec) Commit(ctx context.Context, record []byte, ttl time.Duration) error {
	e.s.mu.Lock()
	defer e.s.mu.Unlock()
	if err := e.s.commitErr; err != nil {
		e.s.commitErr = nil
		return err
	}
	if err := e.s.Complete(ctx, e.key, e.token, record, ttl); err != nil {
		return err
	}
	e.s.committed += e.staged
	return nil
}

func (e *memExec) Discard(ctx context.Context, record []byte, ttl time.Duration) error {
	e.staged = 0
	if record == nil {
		return e.s.Release(ctx, e.key, e.token)
	}
	return e.s.Complete(ctx, e.key, e.token, record, ttl)
}

func (s *memTxStore) writes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.committed
}

func newMemTxStore() *memTxStore { return &memTxStore{MemoryStore: NewMemoryStore()} }

// With a TxStore the client gets the handler's response only once it
// committed; otherwise OUTCOME_NOT_COMMITTED, which says whether the
// commit is known not to have happened.
func TestTxStoreAnswersOnlyACommittedResponse(t *testing.T) {
	store := newMemTxStore()
	flakyRuns := 0
	svc := &testService{OnDo: func(ctx context.Context, req *testingv1.DoRequest, n int64) (*testingv1.DoResponse, error) {
		if err := memWrite(ctx); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		switch req.GetId() {
		case "declined":
			return nil, status.Error(codes.FailedPrecondition, "declined")
		case "flaky":
			if flakyRuns++; flakyRuns == 1 {
				return nil, status.Error(codes.Unavailable, "try again")
			}
		}
		return &testingv1.DoResponse{Id: req.GetId(), Execution: n}, nil
	}}
	env := newTestEnv(t, store, envConfig{svc: svc})
	ctx := testCtx(t)
	do := func(key, id string) (*testingv1.DoResponse, error) {
		return env.client.Do(withKey(ctx, key), &testingv1.DoRequest{Id: id})
	}

	_, err := do("k-ok", "ok")
	require.NoError(t, err)
	require.Equal(t, 1, store.writes())

	_, err = do("k-declined", "declined")
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Equal(t, 1, store.writes(), "a stored error kept its writes")
	_, err = do("k-declined", "declined")
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "the stored error is replayed")

	_, err = do("k-flaky", "flaky")
	require.Equal(t, codes.Unavailable, status.Code(err))
	_, err = do("k-flaky", "flaky")
	require.NoError(t, err, "a released key runs again")
	require.Equal(t, 2, store.writes())

	store.mu.Lock()
	store.commitErr = errors.New("serialization failure")
	store.mu.Unlock()
	_, err = do("k-failed", "failed")
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Equal(t, ReasonNotCommitted, ReasonOf(err))
	require.Contains(t, status.Convert(err).Message(), "did not commit")
	env.events.waitFor(t, OutcomeRolledBack, 1)
	_, err = do("k-failed", "failed")
	require.NoError(t, err, "a retry after a failed commit runs at once: the key was released")
	require.Equal(t, 3, store.writes())

	store.mu.Lock()
	store.commitErr = ErrCommitUnknown
	store.mu.Unlock()
	_, err = do("k-unknown", "unknown")
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Equal(t, ReasonNotCommitted, ReasonOf(err))
	require.Contains(t, status.Convert(err).Message(), "either both committed or neither did")
	env.events.waitFor(t, OutcomeCommitUnknown, 1)
}
