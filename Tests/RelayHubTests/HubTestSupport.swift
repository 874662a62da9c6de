// Helpers shared by the Hub's test suites (the Hub*Tests files, and some of them by HistoryBytesTests):
// a hub with test settings, the objects an emitter writes, and readers of the frames and plans the
// hub returns.

import NIOCore
import Testing

@testable import RelayHub

/// A hub numbering its own events; each parameter is the `HubConfiguration` field of that name.
func makeHub(
    historyLimit: Int = 100,
    maxTopics: Int = 100_000,
    topicTTL: UInt64 = 3600 * 1_000_000_000,
    loopCount: Int = 1,
    patternSnapshotLimit: Int = 1000,
    epochPrefix: String = "test"
) -> Hub {
    Hub(
        configuration: HubConfiguration(
            historyLimit: historyLimit, maxTopics: maxTopics, topicTTL: topicTTL, loopCount: loopCount,
            patternSnapshotLimit: patternSnapshotLimit),
        epochPrefix: epochPrefix)
}

/// The JSON object an emitter would have written for event `n` of `topic`.
func object(_ topic: String, _ n: Int = 0, extra: String = "") -> String {
    #"{"topic":"\#(topic)","type":"progress","n":\#(n)\#(extra)}"#
}

/// Event `n` of `topic` as the ingest hands it to the hub.
func event(_ topic: String, _ n: Int = 0, extra: String = "") -> IncomingEvent {
    IncomingEvent(topic: topic, object: ByteBuffer(string: object(topic, n, extra: extra)))
}

func rawEvent(_ topic: String, _ object: String) -> IncomingEvent {
    IncomingEvent(topic: topic, object: ByteBuffer(string: object))
}

/// What the payload of the frame for `object` numbered `seq` must be: `{"seq":N,` + the object after its `{`.
func expectedPayload(seq: UInt64, object: String) -> [UInt8] {
    Array("{\"seq\":\(seq),".utf8) + Array(object.utf8.dropFirst())
}

/// A decoded server-to-client WebSocket frame.
struct DecodedFrame: Equatable {
    var byte0: UInt8
    var headerLength: Int
    var payload: [UInt8]
    var text: String { String(decoding: payload, as: UTF8.self) }
}

/// Decodes a whole, unmasked frame per RFC 6455 section 5.2; nil (with an issue) when it is not one.
func decode(
    _ frame: ByteBuffer, sourceLocation: SourceLocation = #_sourceLocation
) -> DecodedFrame? {
    let bytes = Array(frame.readableBytesView)
    guard bytes.count >= 2 else {
        Issue.record("frame shorter than a header: \(bytes)", sourceLocation: sourceLocation)
        return nil
    }
    #expect(bytes[1] & 0x80 == 0, "server frames are never masked", sourceLocation: sourceLocation)
    var length = Int(bytes[1] & 0x7F)
    var offset = 2
    if length == 126 {
        guard bytes.count >= 4 else { return nil }
        length = Int(bytes[2]) << 8 | Int(bytes[3])
        offset = 4
        #expect(length >= 126, "16-bit length used for a short payload", sourceLocation: sourceLocation)
    } else if length == 127 {
        guard bytes.count >= 10 else { return nil }
        length = 0
        for index in 2..<10 { length = length << 8 | Int(bytes[index]) }
        offset = 10
        #expect(bytes[2] & 0x80 == 0, "64-bit length must have its top bit clear", sourceLocation: sourceLocation)
        #expect(length > 0xFFFF, "64-bit length used for a payload that fits 16 bits", sourceLocation: sourceLocation)
    }
    guard bytes.count == offset + length else {
        Issue.record(
            "frame holds \(bytes.count - offset) payload bytes, header says \(length)", sourceLocation: sourceLocation)
        return nil
    }
    return DecodedFrame(byte0: bytes[0], headerLength: offset, payload: Array(bytes[offset...]))
}

/// The `seq` a frame's payload starts with.
func seq(of frame: ByteBuffer) -> UInt64? {
    guard let decoded = decode(frame) else { return nil }
    let text = decoded.text
    guard text.hasPrefix("{\"seq\":") else { return nil }
    let digits = text.dropFirst(7).prefix { $0.isNumber }
    return UInt64(digits)
}

func seqs(_ frames: [ByteBuffer]) -> [UInt64?] { frames.map(seq(of:)) }

/// The `"topic"` value of an event frame made by `object(_:_:)`.
func topic(of frame: ByteBuffer) -> String? {
    guard let text = decode(frame)?.text, let start = text.firstRange(of: "\"topic\":\"")?.upperBound,
        let end = text[start...].firstIndex(of: "\"")
    else { return nil }
    return String(text[start..<end])
}

func bytes(_ buffer: ByteBuffer) -> [UInt8] { Array(buffer.readableBytesView) }

func sub(_ loop: Int, _ serial: UInt64) -> SubscriberID { SubscriberID(loop: loop, serial: serial) }

/// One run of a loop's plan, materialised for checking.
struct Run {
    var frames: [ByteBuffer]
    var subscribers: [SubscriberID]
}

func runs(_ plan: LoopPlan) -> [Run] {
    var out: [Run] = []
    plan.forEachRun { targets, range in
        let subscribers: [SubscriberID]
        switch targets {
        case .one(let id): subscribers = [id]
        case .many(let ids): subscribers = ids
        }
        out.append(Run(frames: Array(plan.frames[range]), subscribers: subscribers))
    }
    return out
}

/// Every subscriber listed in a plan, loop by loop, frame by frame: (subscriber, seq, topic).
func deliveries(_ plan: FanOut) -> [(SubscriberID, UInt64?, String?)] {
    var out: [(SubscriberID, UInt64?, String?)] = []
    for loop in plan.loops {
        for delivery in runs(loop) {
            for frame in delivery.frames {
                for id in delivery.subscribers { out.append((id, seq(of: frame), topic(of: frame))) }
            }
        }
    }
    return out
}

/// Names of the topics the hub still holds (that have had an event).
func topicNames(_ hub: Hub) -> Set<String> { Set(hub.snapshot().map(\.name)) }
