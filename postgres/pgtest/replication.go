package pgtest

// Streaming replication for failover tests: a primary, a hot standby made
// from its base backup, a synchronous standby on demand, a kill that loses
// the machine, and a promotion.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// StartPrimary starts a cluster of t's own to replicate from, stopped when
// t ends. Unlike [Start]'s clusters it runs with synchronous_commit on (the
// server's default): a commit returns once its WAL is written, and, once
// [Cluster.SyncStandby] named a synchronous standby, once that standby
// flushed it too. Without a synchronous standby its standbys replicate
// asynchronously.
func StartPrimary(t testing.TB) *Cluster {
	t.Helper()
	c, err := start(Require(t), "synchronous_commit=on")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

// StartStandby takes a base backup of c (pg_basebackup, as the postgres
// user when run as root) and starts it as a hot standby streaming c's WAL,
// stopped when t ends. The standby connects to c at upstream ("host:port",
// e.g. a proxy in front of c that a test can partition), or straight to c
// when upstream is "". It returns once the standby has replayed c's WAL up
// to a point after it started streaming.
func (c *Cluster) StartStandby(t testing.TB, upstream string) *Cluster {
	t.Helper()
	s, err := c.startStandby(upstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	primary := c.conn(ctx, t)
	defer primary.Close(ctx)
	standby := s.conn(ctx, t)
	defer standby.Close(ctx)
	waitFor(ctx, t, "the standby streams from the primary", func() (bool, error) {
		var n int
		err := primary.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'`).Scan(&n)
		return n > 0, err
	})
	// A write after the stream started reaches the standby: it is
	// replaying, not only connected.
	var lsn string
	if err := primary.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text FROM (SELECT txid_current()) x`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the standby replays the primary's writes", func() (bool, error) {
		var ok bool
		err := standby.QueryRow(ctx, `SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn`, lsn).Scan(&ok)
		return ok, err
	})
	return s
}

func (c *Cluster) startStandby(upstream string) (*Cluster, error) {
	s, err := newCluster(c.bin)
	if err != nil {
		return nil, err
	}
	if out, err := s.run("pg_basebackup", "-D", s.data(), "-h", "127.0.0.1", "-p", strconv.Itoa(c.Port), "-U", "postgres",
		"-X", "stream", "-c", "fast", "-R", "--no-sync"); err != nil {
		os.RemoveAll(s.dir)
		return nil, fmt.Errorf("pgtest: pg_basebackup: %v\n%s", err, out)
	}
	if upstream == "" {
		upstream = "127.0.0.1:" + strconv.Itoa(c.Port)
	}
	host, port, err := net.SplitHostPort(upstream)
	if err != nil {
		os.RemoveAll(s.dir)
		return nil, fmt.Errorf("pgtest: standby upstream %q: %w", upstream, err)
	}
	// -R wrote standby.signal and a primary_conninfo to c itself; the last
	// setting in the file wins.
	conninfo := fmt.Sprintf("\nprimary_conninfo = 'host=%s port=%s user=postgres application_name=pgtest_standby'\n", host, port)
	f, err := os.OpenFile(filepath.Join(s.data(), "postgresql.auto.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(conninfo)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		os.RemoveAll(s.dir)
		return nil, fmt.Errorf("pgtest: standby configuration: %w", err)
	}
	if err := s.launch(c.settings); err != nil {
		os.RemoveAll(s.dir)
		return nil, err
	}
	return s, nil
}

// SyncStandby makes c commit synchronously: synchronous_standby_names =
// '*' (ALTER SYSTEM, reloaded), so each commit waits until one standby has
// flushed its WAL. It returns once a standby reports sync_state 'sync'.
func (c *Cluster) SyncStandby(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn := c.conn(ctx, t)
	defer conn.Close(ctx)
	for _, q := range []string{`ALTER SYSTEM SET synchronous_standby_names = '*'`, `SELECT pg_reload_conf()`} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(ctx, t, "a synchronous standby", func() (bool, error) {
		var n int
		err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'`).Scan(&n)
		return n > 0, err
	})
}

// Kill SIGKILLs the server's whole process group (the postmaster and
// every backend, the WAL senders included) at once, as a machine that
// dies: no further byte of WAL reaches a standby, and the connections of
// its clients are reset. It returns once the port refuses connections.
// [Cluster.Stop] still deletes the files. Unlike the helpers that take a
// testing.TB, it may be called from any goroutine.
func (c *Cluster) Kill() error {
	b, err := os.ReadFile(filepath.Join(c.data(), "postmaster.pid"))
	if err != nil {
		return fmt.Errorf("pgtest: kill: %w", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		return fmt.Errorf("pgtest: kill: postmaster.pid: %w", err)
	}
	// pg_ctl starts the postmaster in a session of its own (setsid), so
	// its process group is the postmaster and all its children.
	if pgid, err := syscall.Getpgid(pid); err != nil || pgid != pid {
		return fmt.Errorf("pgtest: kill: the postmaster (%d) does not lead its process group (%d, %v)", pid, pgid, err)
	}
	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("pgtest: kill: %w", err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		conn, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(c.Port), time.Second)
		if err != nil {
			return nil
		}
		conn.Close()
		if time.Now().After(deadline) {
			return errors.New("pgtest: kill: the port still accepts connections 30s after SIGKILL")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Promote ends a standby's recovery (pg_ctl promote, waiting until it
// accepts writes): it replays the WAL it received and becomes a primary.
// It may be called from any goroutine.
func (c *Cluster) Promote() error {
	if out, err := c.run("pg_ctl", "-D", c.data(), "-w", "-t", "60", "promote"); err != nil {
		return fmt.Errorf("pgtest: pg_ctl promote: %v\n%s", err, out)
	}
	return nil
}

func (c *Cluster) conn(ctx context.Context, t testing.TB) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, c.DSN)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// waitFor polls cond until it holds, failing t when ctx ends first.
func waitFor(ctx context.Context, t testing.TB, what string, cond func() (bool, error)) {
	t.Helper()
	var err error
	for {
		var ok bool
		if ok, err = cond(); ok && err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pgtest: waiting for %s: %v (last error: %v)", what, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
