//! Records for unit tests: an event on a thread, a device-TLB submission, a return; a real
//! incident.

use crate::event::{
    Descriptor, Event, FixedStr, Iommu, KTime, Meta, Payload, Record, Sid, Submit, SubmitReturn,
};

/// An event at `ts` ns on thread `tid` (its own process), CPU 0.
pub fn ev(ts: u64, tid: u32, payload: Payload) -> Record {
    Record::Event(Event {
        meta: Meta {
            ts: KTime(ts),
            cpu: 0,
            pid: tid,
            tid,
            comm: FixedStr::new("t"),
        },
        payload,
    })
}

/// A submission on `dmar0` of one device-TLB descriptor to `sid`.
pub fn submit(sid: u16) -> Payload {
    Payload::Submit(Submit {
        iommu: Iommu {
            ptr: 1,
            name: FixedStr::new("dmar0"),
            segment: Some(0),
        },
        options: 0,
        count: 1,
        raw: [Descriptor::dev_tlb_raw(Sid(sid), Sid(sid), 0, 0, 0)]
            .into_iter()
            .collect(),
        others: Default::default(),
        stack: None,
    })
}

/// A return of 0 without a start time (as ABI 3 probes send it).
pub fn ret() -> Payload {
    Payload::SubmitReturn(SubmitReturn {
        ret: 0,
        start: None,
    })
}

/// A real incident: the first one the simulated `w1-driver-inflight` scenario raises.
pub fn first_incident() -> crate::correlate::incident::Incident {
    use crate::correlate::{Config, Correlator};
    let sim = crate::simulate::generate("w1-driver-inflight", 1).unwrap();
    let mut c = Correlator::new(Config::default());
    let mut out = Vec::new();
    for r in sim.records {
        out.extend(c.push_owned(r));
    }
    out.extend(c.finish().incidents);
    out.into_iter().next().unwrap()
}
