//! The consumer's side of incremental fetch sessions (KIP-227), for `strom bench` and
//! `strom consume`.

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::messages::{FetchRequest, FetchResponse};

use crate::model::ErrorCode;

/// A consumer's side of an incremental fetch session (KIP-227), as the Java consumer keeps one: the
/// first request lists every partition and opens the session; each later one names only the
/// partitions whose position moved, and the response carries only partitions with news. Without
/// it, every Fetch of a 1,000-partition consumer would send and receive 1,000 entries.
#[derive(Default)]
pub struct FetchSession {
    pub id: i32,
    /// The epoch the next request carries: 0 opens a new session.
    epoch: i32,
    /// The positions the broker's session holds.
    known: HashMap<i32, i64>,
}

impl FetchSession {
    /// The partitions the next request names (all of them when opening a session), with their
    /// positions; sets the request's session id and epoch.
    pub fn next(
        &mut self,
        req: &mut FetchRequest,
        offsets: &BTreeMap<i32, i64>,
    ) -> Vec<(i32, i64)> {
        // Another set of partitions (a rebalance, a leader that moved) starts a new session:
        // partitions the broker's session holds and the client no longer reads are not named.
        let same_set =
            self.known.len() == offsets.len() && offsets.keys().all(|p| self.known.contains_key(p));
        if self.id == 0 || !same_set {
            self.id = 0;
            self.epoch = 0;
            self.known.clear();
        }
        req.session_id = self.id;
        req.session_epoch = self.epoch;
        let changed: Vec<(i32, i64)> = offsets
            .iter()
            .filter(|(p, o)| self.known.get(p) != Some(o))
            .map(|(p, o)| (*p, *o))
            .collect();
        self.known.extend(changed.iter().copied());
        changed
    }

    /// Takes the response's session id; a session the broker no longer has starts over. True
    /// when the response's error is only that the session was lost.
    pub fn answered(&mut self, resp: &FetchResponse) -> bool {
        let lost = [
            ErrorCode::FETCH_SESSION_ID_NOT_FOUND.0,
            ErrorCode::INVALID_FETCH_SESSION_EPOCH.0,
        ]
        .contains(&resp.error_code);
        if lost || resp.error_code != 0 || resp.session_id == 0 {
            self.id = 0;
            return lost;
        }
        self.id = resp.session_id;
        // Epochs run 1..=i32::MAX and wrap to 1 (0 would open a new session).
        self.epoch = if self.epoch == i32::MAX {
            1
        } else {
            self.epoch + 1
        };
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(session: &mut FetchSession, offsets: &BTreeMap<i32, i64>) -> (i32, i32, Vec<i32>) {
        let mut req = FetchRequest::default();
        let named = session.next(&mut req, offsets);
        (
            req.session_id,
            req.session_epoch,
            named.iter().map(|(p, _)| *p).collect(),
        )
    }

    fn answer(session: &mut FetchSession, id: i32, error: ErrorCode) -> bool {
        let mut resp = FetchResponse::default();
        resp.session_id = id;
        resp.error_code = error.0;
        session.answered(&resp)
    }

    #[test]
    fn a_session_names_only_moved_partitions_and_starts_over_when_lost() {
        let mut session = FetchSession::default();
        let mut offsets: BTreeMap<i32, i64> = (0..4).map(|p| (p, 0)).collect();
        assert_eq!(request(&mut session, &offsets), (0, 0, vec![0, 1, 2, 3]));
        assert!(!answer(&mut session, 7, ErrorCode::NONE));
        assert_eq!(request(&mut session, &offsets), (7, 1, vec![]));
        assert!(!answer(&mut session, 7, ErrorCode::NONE));
        offsets.insert(2, 5);
        assert_eq!(request(&mut session, &offsets), (7, 2, vec![2]));
        assert!(answer(
            &mut session,
            0,
            ErrorCode::INVALID_FETCH_SESSION_EPOCH
        ));
        // A new session lists everything again.
        assert_eq!(request(&mut session, &offsets), (0, 0, vec![0, 1, 2, 3]));
        assert!(!answer(&mut session, 9, ErrorCode::NONE));
        session.epoch = i32::MAX;
        assert_eq!(request(&mut session, &offsets), (9, i32::MAX, vec![]));
        assert!(!answer(&mut session, 9, ErrorCode::NONE));
        assert_eq!(request(&mut session, &offsets), (9, 1, vec![]));
        assert!(!answer(&mut session, 9, ErrorCode::NONE));
        // Another set of partitions (a rebalance) opens a new session that lists them all.
        offsets.remove(&0);
        assert_eq!(request(&mut session, &offsets), (0, 0, vec![1, 2, 3]));
    }
}
