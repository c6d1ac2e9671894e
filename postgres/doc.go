// Package idempotencypg is a Postgres store for the idempotency
// interceptor.
package idempotencypg
