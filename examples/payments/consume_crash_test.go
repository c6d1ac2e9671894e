package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/idempotency-grpc/idempotency/postgres/pgtest"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

const (
	// consumeStormMessages is the fewest messages the consumer storm
	// feeds; it feeds more until it made consumeStormKills kills.
	consumeStormMessages = 500
	consumeStormKills    = 10
)

// TestConsumeCrashStorm is the proof of the consume command: two consumers
// of one group, each a real process of the example with its charges and
// idempotency records in one Postgres, charge the messages of a stream in
// a real redis-server while the test feeds it (every tenth message is
// written twice, as a producer retrying its XADD would) and SIGKILLs the
// consumers at random moments; they also SIGKILL themselves at random
// points of a charge (before its write, after it, and after its outcome
// committed but before the XACK). Each restart joins under a new consumer
// name, so what a dead consumer held comes back only through the other's
// XAUTOCLAIM. Once the stream is drained (every entry delivered, none
// pending), every message's key must have exactly one charge row, and
// every acknowledgement a consumer logged for a key must name that row.
func TestConsumeCrashStorm(t *testing.T) {
	skipUnlessLong(t)
	redisAddr := startRedisServer(t)
	pg := pgtest.Start(t)
	bin := exampleBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	defer rdb.Close()
	const stream, group = "charges", "payments"
	if err := rdb.XGroupCreateMkStream(ctx, stream, group, "0").Err(); err != nil {
		t.Fatal(err)
	}

	logPath := filepath.Join(t.TempDir(), "consumers.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()

	var outerKills, exits atomic.Int64
	var exitMu sync.Mutex
	exitErrs := map[string]int64{} // how consumers that were not killed from outside ended
	var killing atomic.Bool
	killing.Store(true)
	done := make(chan struct{})
	var supervisors sync.WaitGroup
	for slot := range 2 {
		supervisors.Go(func() {
			for gen := 0; ; gen++ {
				cmd := exec.Command(bin, "consume", "--redis", redisAddr, "--postgres", pg.DSN,
					"--consumer", fmt.Sprintf("c%d-%d", slot, gen), "--claim-idle", "1s", "--lease", "2s", "--chaos-kill", "0.01")
				cmd.Stdout, cmd.Stderr = logf, logf
				if err := cmd.Start(); err != nil {
					t.Errorf("start a consumer: %v", err)
					return
				}
				exited := make(chan struct{})
				var waitErr error
				go func() { waitErr = cmd.Wait(); close(exited) }()
				var kill <-chan time.Time
				if killing.Load() {
					kill = time.After(time.Duration(150+rand.IntN(750)) * time.Millisecond)
				}
				select {
				case <-exited:
					exits.Add(1) // --chaos-kill, or a failure the log shows
					exitMu.Lock()
					exitErrs[fmt.Sprint(waitErr)]++
					exitMu.Unlock()
				case <-kill:
					_ = cmd.Process.Signal(syscall.SIGKILL)
					<-exited
					outerKills.Add(1)
				case <-done:
					_ = cmd.Process.Signal(syscall.SIGKILL)
					<-exited
					return
				}
			}
		})
	}
	stopConsumers := sync.OnceFunc(func() { close(done); supervisors.Wait() })
	defer stopConsumers()

	// The producer: a message every few milliseconds, at least
	// consumeStormMessages, and more until consumeStormKills kills.
	start := time.Now()
	keys := 0
	var lastID string
	add := func(i int) {
		id, err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []string{
			fieldAccount, fmt.Sprintf("acct_%d", i%10), fieldAmount, strconv.Itoa(100 + i), fieldCurrency, "EUR",
			fieldKey, fmt.Sprintf("msg-%04d", i),
		}}).Result()
		if err != nil {
			t.Fatalf("XADD: %v", err)
		}
		lastID = id
	}
	tick := time.NewTicker(8 * time.Millisecond)
	for ; keys < consumeStormMessages || outerKills.Load() < consumeStormKills; keys++ {
		if ctx.Err() != nil {
			t.Fatalf("only %d kills in %v", outerKills.Load(), time.Since(start))
		}
		<-tick.C
		add(keys)
		if keys%10 == 0 {
			add(keys) // the producer's retry
		}
	}
	tick.Stop()
	fed := time.Since(start)
	killing.Store(false)

	// Drained: every entry delivered to the group, none pending.
	for {
		groups, err := rdb.XInfoGroups(ctx, stream).Result()
		if err != nil {
			t.Fatalf("XINFO GROUPS: %v", err)
		}
		if len(groups) == 1 && groups[0].LastDeliveredID == lastID && groups[0].Pending == 0 {
			break
		}
		select {
		case <-ctx.Done():
			logs, _ := os.ReadFile(logPath)
			t.Fatalf("the stream was not drained: %+v\n%s", groups, tail(string(logs), 40))
		case <-time.After(50 * time.Millisecond):
		}
	}
	drained := time.Since(start)
	stopConsumers()

	pool, err := pgxpool.New(ctx, pg.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	rows, err := pool.Query(ctx, `SELECT idempotency_key, id FROM charges`)
	if err != nil {
		t.Fatal(err)
	}
	chargesOf := map[string][]string{}
	total := 0
	for rows.Next() {
		var key, id string
		if err := rows.Scan(&key, &id); err != nil {
			t.Fatal(err)
		}
		chargesOf[key] = append(chargesOf[key], id)
		total++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var inProgress int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM idempotency_records WHERE state = 1`).Scan(&inProgress); err != nil {
		t.Fatal(err)
	}

	duplicated, lost := 0, 0
	for i := range keys {
		switch n := len(chargesOf[fmt.Sprintf("msg-%04d", i)]); {
		case n == 0:
			lost++
		case n > 1:
			duplicated++
			t.Errorf("msg-%04d was charged %d times: %v", i, n, chargesOf[fmt.Sprintf("msg-%04d", i)])
		}
	}
	unknown := len(chargesOf) - (keys - lost)

	logs, _ := os.ReadFile(logPath)
	acked := regexp.MustCompile(`key=(msg-\d{4}) (executed|replayed): OK (ch_[0-9a-f]+) .*; acknowledged`)
	claimed := regexp.MustCompile(`claimed (\d+) message\(s\)`)
	var executedAcks, replayedAcks, claims, selfKills, wrongAnswers int
	for _, line := range strings.Split(string(logs), "\n") {
		if m := acked.FindStringSubmatch(line); m != nil {
			if m[2] == "executed" {
				executedAcks++
			} else {
				replayedAcks++
			}
			if ids := chargesOf[m[1]]; len(ids) != 1 || ids[0] != m[3] {
				wrongAnswers++
				t.Errorf("%s acknowledged with %s, its rows are %v", m[1], m[3], ids)
			}
		}
		if m := claimed.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			claims += n
		}
		if strings.Contains(line, "chaos: SIGKILL at ") {
			selfKills++
		}
		if strings.HasPrefix(line, "payments consume: ") {
			t.Logf("a consumer failed: %s", line)
		}
	}
	t.Logf("reliability: consumer storm: %d keys (%d messages with the producer's retries) fed in %v, drained after %v; SIGKILLs: %d from outside + %d self = %d (%d exits: %v); %d messages taken over with XAUTOCLAIM; acknowledgements logged: %d executed, %d replayed; charge rows %d: duplicated keys %d, keys without a row %d, rows of unknown keys %d, acknowledgements naming another charge %d; in-progress records left %d",
		keys, keys+(keys+9)/10, fed.Round(time.Millisecond), drained.Round(time.Millisecond), outerKills.Load(), selfKills, outerKills.Load()+int64(selfKills), exits.Load(), exitErrs,
		claims, executedAcks, replayedAcks, total, duplicated, lost, unknown, wrongAnswers, inProgress)
	if duplicated != 0 || lost != 0 || unknown != 0 || total != keys || wrongAnswers != 0 || inProgress != 0 {
		t.Fatalf("exactly once broke: %d rows for %d keys, %d duplicated, %d lost, %d unknown, %d wrong answers, %d in progress",
			total, keys, duplicated, lost, unknown, wrongAnswers, inProgress)
	}
	if failed := exits.Load() - exitErrs["signal: killed"]; failed != 0 {
		t.Fatalf("%d consumers ended other than by a SIGKILL: %v", failed, exitErrs)
	}
	if claims == 0 {
		t.Fatalf("no message was taken over with XAUTOCLAIM: the storm did not test it\n%s", tail(string(logs), 40))
	}
	if replayedAcks == 0 {
		t.Fatalf("no redelivery was replayed: the storm did not test it")
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
