//! How a single record reads: one JSON object (`replay --json`, NDJSON) or one text line.
//!
//! JSON objects carry `record` (`event`, `stack`, `lost`, `device`) and, for events, `kind`
//! (the names of [`crate::event::kind_name`]), `ts_ns`, `cpu`, `pid`, `tid`, `comm` and the
//! decoded fields. Descriptors are decoded (`Descriptor`), with the raw words kept as hex.

use serde_json::{json, Value};

use crate::event::{kind_name, Descriptor, Event, Payload, Record};

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn opt_bdf(b: Option<crate::event::Bdf>) -> Value {
    b.map_or(Value::Null, |b| json!(b.to_string()))
}

/// The decoded fields of an event, without the common header.
pub fn payload_json(p: &Payload) -> Value {
    match p {
        Payload::Submit(s) => {
            let mut v = json!({
            "iommu": s.iommu.name.to_string(),
            "count": s.count,
            "captured": s.captured(),
            "truncated": s.truncated(),
            "options": s.options,
            "descriptors": s.raw_descs().iter().map(|d| {
                let mut v = serde_json::to_value(Descriptor::decode(*d)).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("qw0".into(), json!(hex(d.qw0)));
                    m.insert("qw1".into(), json!(hex(d.qw1)));
                }
                v
            }).collect::<Vec<_>>(),
            "stack": s.stack,
            });
            // ABI 3: descriptors read but not carried (only device-TLB ones are), by type.
            if s.others.count > 0 {
                v["other_descriptors"] = json!({
                    "count": s.others.count,
                    "types": s.others.type_codes().collect::<Vec<_>>(),
                });
            }
            v
        }
        Payload::SubmitReturn(r) => json!({ "ret": r.ret, "start_ns": r.start }),
        Payload::DevTlbFlush(f) => json!({
            "iommu": f.iommu.name.to_string(),
            "sid": f.sid.to_string(),
            "pfsid": f.pfsid.to_string(),
            "qdep": f.qdep,
            "pasid": f.pasid,
            "addr": hex(f.addr),
            "mask": f.mask,
            "stack": f.stack,
        }),
        Payload::HotplugIst(s) | Payload::Unconfigure(s) => json!({
            "port": opt_bdf(s.port),
            "secondary": s.secondary,
            "subordinate": s.subordinate,
            "irq": s.irq,
            "presence": s.presence,
            "removal": s.presence.map(|p| if p { "safe" } else { "surprise" }),
            "stack": s.stack,
        }),
        Payload::HotplugIstReturn(r) => json!({ "ret": r.ret, "start_ns": r.start }),
        Payload::DisconnectWalk(w) => json!({
            "segment": w.segment,
            "bus": w.bus,
            "bus_end": w.bus_end,
            "callback": hex(w.callback),
            "stack": w.stack,
        }),
        Payload::DeviceDisconnected(d) | Payload::DeviceRemove(d) | Payload::IommuRelease(d) => {
            json!({
                "bdf": opt_bdf(d.bdf),
                "sid": d.bdf.map(|b| b.sid().to_string()),
                "vendor": format!("{:04x}", d.vendor),
                "device": format!("{:04x}", d.device),
                "stack": d.stack,
            })
        }
        Payload::KernelLog(l) => json!({ "text": l.text, "truncated": l.truncated }),
        Payload::HotplugTrace(h) => json!({
            "port": opt_bdf(h.port),
            "port_name": h.port_name,
            "slot": h.slot,
            "event": h.what.kernel_name(),
            "event_code": h.what.to_abi(),
        }),
    }
}

/// One event as a JSON object.
pub fn event_json(e: &Event) -> Value {
    let mut v = json!({
        "record": "event",
        "kind": kind_name(e.payload.kind()),
        "ts_ns": e.meta.ts.0,
        "cpu": e.meta.cpu,
        "pid": e.meta.pid,
        "tid": e.meta.tid,
        "comm": e.meta.comm.to_string(),
    });
    if let (Value::Object(m), Value::Object(p)) = (&mut v, payload_json(&e.payload)) {
        m.extend(p);
    }
    if let Payload::SubmitReturn(r) = &e.payload {
        if let Value::Object(m) = &mut v {
            m.insert(
                "latency_ns".into(),
                json!(r.start.map(|s| e.meta.ts.saturating_sub(s))),
            );
        }
    }
    v
}

/// One record as a JSON object.
pub fn record_json(r: &Record) -> Value {
    match r {
        Record::Event(e) => event_json(e),
        Record::Stack(s) => json!({ "record": "stack", "id": s.id, "frames": s.frames }),
        Record::Lost(l) => {
            let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("record".into(), json!("lost"));
            }
            v
        }
        Record::Device(d) => {
            let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("record".into(), json!("device"));
            }
            v
        }
    }
}

fn desc_short(d: Descriptor) -> String {
    match d {
        Descriptor::DevTlb {
            sid,
            addr,
            size_bit,
            ..
        } => {
            format!(
                "dev-tlb {sid} {addr:#x}{}",
                if size_bit { "+S" } else { "" }
            )
        }
        Descriptor::PasidDevTlb { sid, pasid, .. } => format!("pasid-dev-tlb {sid} pasid {pasid}"),
        Descriptor::Iotlb { did } => format!("iotlb did {did}"),
        Descriptor::PasidIotlb { did, pasid } => format!("pasid-iotlb did {did} pasid {pasid}"),
        Descriptor::ContextCache { did, sid } => format!("cc did {did} {sid}"),
        Descriptor::Wait => "wait".into(),
        Descriptor::Other { code } => format!("type {code:#x}"),
    }
}

/// One record as a text line (dmesg-like timestamp first).
pub fn record_line(r: &Record) -> String {
    match r {
        Record::Event(e) => {
            let who = format!(
                "{:>12.6} cpu{} {}[{}]",
                e.meta.ts.0 as f64 / 1e9,
                e.meta.cpu,
                e.meta.comm,
                e.meta.tid
            );
            let what = match &e.payload {
                Payload::Submit(s) => {
                    let mut d: Vec<String> = s.descriptors().map(desc_short).collect();
                    if s.others.count > 0 {
                        let types: Vec<String> =
                            s.others.type_codes().map(|t| format!("{t:#x}")).collect();
                        d.push(format!(
                            "+{} other (type {})",
                            s.others.count,
                            types.join("/")
                        ));
                    }
                    format!(
                        "submit {} count={} [{}]{}",
                        s.iommu.name,
                        s.count,
                        d.join(", "),
                        if s.truncated() { " (truncated)" } else { "" }
                    )
                }
                Payload::SubmitReturn(ret) => match ret.start {
                    Some(st) => format!(
                        "submit-return ret={} latency={}ns",
                        ret.ret,
                        e.meta.ts.saturating_sub(st)
                    ),
                    None => format!("submit-return ret={} (entry not seen)", ret.ret),
                },
                Payload::DevTlbFlush(f) => format!(
                    "devtlb-flush {} sid={} addr={:#x} mask={}{}",
                    f.iommu.name,
                    f.sid,
                    f.addr,
                    f.mask,
                    f.pasid.map(|p| format!(" pasid={p}")).unwrap_or_default()
                ),
                Payload::HotplugIst(s) => format!(
                    "hotplug-ist port={} buses {:02x}-{:02x} irq={}",
                    opt_bdf(s.port).as_str().unwrap_or("?"),
                    s.secondary,
                    s.subordinate,
                    s.irq
                ),
                Payload::HotplugIstReturn(r) => format!("hotplug-ist-return ret={}", r.ret),
                Payload::Unconfigure(s) => format!(
                    "unconfigure port={} presence={} ({} removal)",
                    opt_bdf(s.port).as_str().unwrap_or("?"),
                    s.presence.map_or("?".into(), |p| p.to_string()),
                    match s.presence {
                        Some(true) => "safe",
                        Some(false) => "surprise",
                        None => "unknown",
                    }
                ),
                Payload::DisconnectWalk(w) => {
                    format!("disconnect-walk buses {:02x}-{:02x}", w.bus, w.bus_end)
                }
                Payload::DeviceDisconnected(d)
                | Payload::DeviceRemove(d)
                | Payload::IommuRelease(d) => format!(
                    "{} {} {:04x}:{:04x}",
                    kind_name(e.payload.kind()),
                    opt_bdf(d.bdf).as_str().unwrap_or("(not PCI)"),
                    d.vendor,
                    d.device
                ),
                Payload::KernelLog(l) => format!("log: {}", l.text),
                Payload::HotplugTrace(h) => format!(
                    "pci_hp_event {} slot {} {}",
                    h.port_name,
                    h.slot,
                    h.what.kernel_name()
                ),
            };
            format!("{who} {what}")
        }
        Record::Stack(s) => format!("stack #{}: {}", s.id.0, s.frames.join(" <- ")),
        Record::Lost(l) => format!(
            "LOST after {}: {} ring-buffer full, {} missed, {} undecodable",
            l.after, l.ringbuf_full, l.missed, l.undecodable
        ),
        Record::Device(d) => format!(
            "device {} {:04x}:{:04x} driver={} slot={} ats={}",
            d.bdf,
            d.vendor,
            d.device,
            d.driver.as_deref().unwrap_or("-"),
            d.slot.as_deref().unwrap_or("-"),
            d.ats.map_or("?".into(), |a| a.to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;

    #[test]
    fn a_submission_renders_its_decoded_batch() {
        let mut raw = [RawDesc::default(); itewatch_common::MAX_BATCH];
        raw[0] = RawDesc {
            qw0: 0x10002,
            qw1: 0,
        };
        raw[1] = RawDesc {
            qw0: 0x0000010000000003,
            qw1: 0x1000,
        };
        let e = Event {
            meta: Meta {
                ts: KTime(1_500_000_000),
                cpu: 1,
                pid: 9,
                tid: 9,
                comm: FixedStr::new("dd"),
            },
            payload: Payload::Submit(Submit {
                iommu: Iommu {
                    ptr: 1,
                    name: FixedStr::new("dmar0"),
                    segment: Some(0),
                },
                options: 0,
                count: 2,
                raw: raw[..2].into(),
                others: Default::default(),
                stack: None,
            }),
        };
        let v = event_json(&e);
        assert_eq!(v["kind"], "submit");
        assert_eq!(v["descriptors"][1]["type"], "dev-tlb");
        assert_eq!(v["descriptors"][1]["sid"], 0x0100);
        assert_eq!(v["descriptors"][1]["qw0"], "0x10000000003");
        let line = record_line(&Record::Event(e));
        // A SID as the kernel prints it (`SID %llx`).
        assert!(line.contains("dev-tlb 100 "), "{line}");
        assert!(line.contains("iotlb did 1"), "{line}");
    }
}
