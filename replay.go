// Answering a repeat from a stored record.

package idempotency

import (
	"bytes"
	"context"
	"fmt"

	idempotencyv1 "github.com/idempotency-grpc/idempotency/proto/idempotency/v1"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// answer answers a repeat from a completed or too-large record.
func (s *server) answer(ctx context.Context, c *call, rec *idempotencyv1.Record) (any, error) {
	if !bytes.Equal(rec.GetFingerprint(), c.fp) {
		return nil, s.fail(ctx, c, OutcomeKeyReused, errKeyReused(c.method), nil)
	}
	c.final = rec
	if rec.GetState() == idempotencyv1.Record_STATE_TOO_LARGE {
		return nil, s.fail(ctx, c, OutcomeAlreadyProcessed, errTooLarge(c.method, rec.GetResponseSize()), nil)
	}
	return s.replay(ctx, c, rec)
}

// replay answers a repeat from a completed record.
func (s *server) replay(ctx context.Context, c *call, rec *idempotencyv1.Record) (any, error) {
	code := codes.Code(rec.GetStatus().GetCode())
	if s.o.rejectRepeats {
		return nil, s.refuseRepeat(ctx, c, rec)
	}
	stored := Stored{Status: okStatus}
	if code == codes.OK {
		resp, err := s.storedResponse(c, rec)
		if err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
		}
		stored.Response = resp
	} else {
		stored.Status = status.FromProto(storedStatus(rec))
	}
	var hdropped, tdropped []string
	stored.Header, hdropped = entriesToMD(rec.GetHeader(), 1)
	stored.Header[ReplayedHeader] = append(stored.Header[ReplayedHeader], "true")
	if len(rec.GetTrailer()) > 0 {
		stored.Trailer, tdropped = entriesToMD(rec.GetTrailer(), 0)
	}
	c.ev.DroppedMetadata = droppedKeys(hdropped, tdropped)
	c.ev.Outcome, c.ev.Code = OutcomeReplayed, code
	s.emit(ctx, c)
	return c.x.Replay(ctx, stored)
}

// storedResponse decodes the stored response of rec, a completed record
// of a response, into a message of its type.
func (s *server) storedResponse(c *call, rec *idempotencyv1.Record) (proto.Message, error) {
	mt, err := s.policies.messageType(c.method, rec.GetResponseType())
	if err != nil {
		return nil, err
	}
	resp := mt.New().Interface()
	if err := proto.Unmarshal(rec.GetResponse(), resp); err != nil {
		return nil, fmt.Errorf("%w: response: %v", ErrCorruptRecord, err)
	}
	return resp, nil
}

// refuseRepeat refuses a repeat in reject-repeats mode (AlreadyExists)
// with the stored outcome as it is: the response bytes in an Any of the
// response type, or the stored error as a google.rpc.Status.
//
//go:noinline
func (s *server) refuseRepeat(ctx context.Context, c *call, rec *idempotencyv1.Record) error {
	var detail proto.Message = storedStatus(rec)
	if rec.GetStatus().GetCode() == int32(codes.OK) {
		detail = &anypb.Any{TypeUrl: "type.googleapis.com/" + rec.GetResponseType(), Value: rec.GetResponse()}
	}
	return s.fail(ctx, c, OutcomeAlreadyProcessed, errAlreadyProcessed(c.method, detail), nil)
}

// storedStatus returns the stored status of rec as a google.rpc.Status.
func storedStatus(rec *idempotencyv1.Record) *spb.Status {
	return &spb.Status{Code: rec.GetStatus().GetCode(), Message: rec.GetStatus().GetMessage(), Details: rec.GetStatus().GetDetails()}
}
