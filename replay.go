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
	sp := &spb.Status{Code: rec.GetStatus().GetCode(), Message: rec.GetStatus().GetMessage(), Details: rec.GetStatus().GetDetails()}
	if s.o.rejectRepeats {
		// The stored outcome travels as is: the response bytes in an Any of
		// the response type, or the stored error as a google.rpc.Status.
		var detail proto.Message = sp
		if sp.Code == int32(codes.OK) {
			detail = &anypb.Any{TypeUrl: "type.googleapis.com/" + rec.GetResponseType(), Value: rec.GetResponse()}
		}
		return nil, s.fail(ctx, c, OutcomeAlreadyProcessed, errAlreadyProcessed(c.method, detail), nil)
	}
	var resp proto.Message
	if sp.Code == int32(codes.OK) {
		mt, err := s.policies.messageType(c.method, rec.GetResponseType())
		if err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), err)
		}
		resp = mt.New().Interface()
		if err := proto.Unmarshal(rec.GetResponse(), resp); err != nil {
			return nil, s.fail(ctx, c, OutcomeRecordCorrupt, errCorrupt(c.method), fmt.Errorf("%w: response: %v", ErrCorruptRecord, err))
		}
	}
	header, hdropped := entriesToMD(rec.GetHeader())
	header.Append(ReplayedHeader, "true")
	stored := Stored{Response: resp, Status: okStatus, Header: header}
	if sp.Code != int32(codes.OK) {
		stored.Status = status.FromProto(sp)
	}
	var tdropped []string
	if len(rec.GetTrailer()) > 0 {
		stored.Trailer, tdropped = entriesToMD(rec.GetTrailer())
	}
	c.ev.DroppedMetadata = droppedKeys(hdropped, tdropped)
	c.ev.Outcome, c.ev.Code = OutcomeReplayed, codes.Code(sp.Code)
	s.emit(ctx, c)
	return c.x.Replay(ctx, stored)
}
