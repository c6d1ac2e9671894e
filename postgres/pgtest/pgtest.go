// Package pgtest starts throwaway PostgreSQL clusters for tests: initdb
// into a temporary directory (as the postgres user when run as root, since
// initdb refuses root), fsync off, on a free loopback port, stopped with
// pg_ctl stop -m immediate and deleted when the test ends. For failover
// tests, [StartPrimary] and [Cluster.StartStandby] make a primary and a
// streaming hot standby (synchronous with [Cluster.SyncStandby]), and
// [Cluster.Kill] and [Cluster.Promote] fail it over.
//
// It looks for the server binaries in $IDEMPOTENCY_PG_BIN, then in
// Debian's /usr/lib/postgresql/<version>/bin (the newest), then on PATH.
// Without them a test skips with a message that says what to install; when
// the CI environment variable is set it fails instead, so CI never
// silently skips the real-Postgres tests.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Cluster is a running throwaway PostgreSQL server.
type Cluster struct {
	// DSN connects to its postgres database as the postgres superuser.
	DSN string
	// Port is the loopback port it listens on.
	Port     int
	bin      string
	dir      string
	asPG     bool     // run its tools as the postgres user
	settings []string // the -c settings it was started with
}

// BinDir returns the directory of initdb and pg_ctl, or "" when none is
// installed.
func BinDir() string {
	if d := os.Getenv("IDEMPOTENCY_PG_BIN"); d != "" {
		return d
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	return ""
}

func version(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

// Require skips t (fails it when CI is set) unless the PostgreSQL server
// binaries are installed.
func Require(t testing.TB) string {
	t.Helper()
	bin := BinDir()
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("PostgreSQL's initdb is not installed and CI is set: the real-Postgres tests must run in CI (apt-get install postgresql)")
		}
		t.Skip("PostgreSQL's initdb is not installed; install it (apt-get install postgresql) to run the real-Postgres tests")
	}
	return bin
}

var (
	sharedMu sync.Mutex
	shared   *Cluster
)

// Shared returns one cluster for the whole test binary, started on first
// use; Stop it from TestMain (see [StopShared]). Tests sharing it keep
// apart by table or database names.
func Shared(t testing.TB) *Cluster {
	t.Helper()
	bin := Require(t)
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared == nil {
		c, err := start(bin)
		if err != nil {
			t.Fatal(err)
		}
		shared = c
	}
	return shared
}

// StopShared stops the cluster Shared started, if any. Call it from
// TestMain after m.Run.
func StopShared() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.Stop()
		shared = nil
	}
}

// Start starts a cluster of t's own, stopped when t ends.
func Start(t testing.TB) *Cluster {
	t.Helper()
	c, err := start(Require(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

func start(bin string, settings ...string) (*Cluster, error) {
	c, err := newCluster(bin)
	if err != nil {
		return nil, err
	}
	if out, err := c.run("initdb", "-D", c.data(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		os.RemoveAll(c.dir)
		return nil, fmt.Errorf("pgtest: initdb: %v\n%s", err, out)
	}
	if err := c.launch(settings); err != nil {
		os.RemoveAll(c.dir)
		return nil, err
	}
	return c, nil
}

// newCluster makes the cluster's directory, owned by the postgres user
// when running as root.
func newCluster(bin string) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{bin: bin, dir: dir}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgtest: running as root, and there is no postgres user to run initdb as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		c.asPG = true
	}
	return c, nil
}

func (c *Cluster) data() string { return filepath.Join(c.dir, "data") }

// launch starts the server on c's data directory on a free port, with
// settings (-c name=value each) after the throwaway defaults, so they win.
func (c *Cluster) launch(settings []string) error {
	for range 5 {
		port, err := freePort()
		if err != nil {
			break
		}
		opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300", port, c.dir)
		for _, s := range settings {
			opts += " -c " + s
		}
		out, err := c.run("pg_ctl", "-D", c.data(), "-o", opts, "-l", filepath.Join(c.dir, "log"), "-w", "-t", "60", "start")
		if err != nil {
			log, _ := os.ReadFile(filepath.Join(c.dir, "log"))
			if strings.Contains(string(log), "Address already in use") {
				continue // the port was taken since; try another
			}
			return fmt.Errorf("pgtest: pg_ctl start: %v\n%s\n%s", err, out, log)
		}
		c.Port = port
		c.DSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
		c.settings = settings
		return nil
	}
	return errors.New("pgtest: no free port would do")
}

func (c *Cluster) run(tool string, args ...string) ([]byte, error) {
	path := filepath.Join(c.bin, tool)
	var cmd *exec.Cmd
	if c.asPG {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = c.dir
	return cmd.CombinedOutput()
}

// Stop stops the server at once (pg_ctl stop -m immediate) and deletes its
// files.
func (c *Cluster) Stop() {
	_, _ = c.run("pg_ctl", "-D", c.data(), "-m", "immediate", "-w", "stop")
	os.RemoveAll(c.dir)
}

// Pool connects a pool to the cluster, closed when t ends. config tweaks
// the pool's settings (may be nil).
func (c *Cluster) Pool(t testing.TB, config func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(c.DSN)
	if err != nil {
		t.Fatal(err)
	}
	if config != nil {
		config(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
