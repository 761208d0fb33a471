//! InitProducerId: ids for idempotent producers from the coordinator's reserved blocks, and
//! KIP-360 epoch bumps; transactional ids are refused.

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    init_producer_id_response::InitProducerIdResponse, InitProducerIdRequest, ProducerId,
};
use kafka_protocol::ResponseError;

use super::code;
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 0..=4;

impl Broker {
    pub(crate) fn init_producer_id(&self, req: InitProducerIdRequest) -> InitProducerIdResponse {
        let refuse = |e: ResponseError| {
            InitProducerIdResponse::default()
                .with_error_code(code(e))
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
        };
        if req.transactional_id.is_some() {
            tracing::warn!(
                "InitProducerId with a transactional id refused: transactions are not supported"
            );
            return refuse(ResponseError::InvalidRequest);
        }
        // KIP-360: a known producer may ask to bump its epoch instead of getting a new id.
        if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
            if !self.groups.producer_id_issued(req.producer_id.0) {
                return refuse(ResponseError::InvalidProducerIdMapping);
            }
            return InitProducerIdResponse::default()
                .with_producer_id(req.producer_id)
                .with_producer_epoch(req.producer_epoch + 1);
        }
        match self.groups.next_producer_id() {
            Ok(id) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(0),
            Err(_) => refuse(ResponseError::KafkaStorageError),
        }
    }
}
