// Command idempotency-sweep deletes expired idempotency records from a
// Postgres table of the idempotency postgres store, for cron or a
// Kubernetes CronJob when no server runs the store's in-process sweeper:
//
//	idempotency-sweep -dsn "$DATABASE_URL"                 # until no expired row is left
//	idempotency-sweep -dsn "$DATABASE_URL" -every 1m       # forever, as a sidecar
//
// It exits 0 after a clean pass, 1 on an error, 2 on bad flags.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	idempotencypg "github.com/idempotency-grpc/idempotency/postgres"
	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	dsn := flag.String("dsn", os.Getenv("DATABASE_URL"), "the database (default $DATABASE_URL)")
	table := flag.String("table", idempotencypg.DefaultTable, "the records' table: name or schema.name")
	batch := flag.Int("batch", 1000, "rows per DELETE")
	every := flag.Duration("every", 0, "keep running, one pass per interval (0: one pass, then exit)")
	flag.Parse()
	if *dsn == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*dsn, *table, *batch, *every); err != nil {
		fmt.Fprintln(os.Stderr, "idempotency-sweep:", err)
		os.Exit(1)
	}
}

func run(dsn, table string, batch int, every time.Duration) (err error) {
	defer func() {
		if r := recover(); r != nil { // WithTable refuses a bad name by panicking
			err = fmt.Errorf("%v", r)
		}
	}()
	opt := idempotencypg.WithTable(table)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	store, err := idempotencypg.New(ctx, pool, opt)
	if err != nil {
		return err
	}
	if every > 0 {
		err := store.RunSweeper(ctx, every, batch, func(err error) { fmt.Fprintln(os.Stderr, "idempotency-sweep:", err) })
		if ctx.Err() != nil {
			return nil // stopped by a signal
		}
		return err
	}
	total := 0
	for {
		n, err := store.Sweep(ctx, batch)
		if err != nil {
			return err
		}
		total += n
		if n < batch {
			fmt.Printf("deleted %d expired records from %s\n", total, table)
			return nil
		}
	}
}
