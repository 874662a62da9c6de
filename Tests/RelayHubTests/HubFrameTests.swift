// Tests of the Hub's numbering and event frames: seq per topic from 1, the frame is `{"seq":N,`
// plus the emitted bytes after `{`, and the shortest WebSocket length encoding.

import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: numbering and frames")
struct HubFrameTests {
    @Test("seq counts each topic's events from 1, one by one")
    func seqFromOnePerTopic() {
        let hub = makeHub()
        let watcher = sub(0, 1)
        _ = hub.subscribe(watcher, to: "task:a", resume: nil, now: 0)
        _ = hub.subscribe(watcher, to: "task:b", resume: nil, now: 0)

        let plan = hub.publish(
            [event("task:a", 1), event("task:a", 2), event("task:b", 1), event("task:a", 3)], now: 1)
        let seen = deliveries(plan).map { "\($0.2 ?? "?")#\($0.1.map(String.init) ?? "?")" }
        #expect(seen == ["task:a#1", "task:a#2", "task:b#1", "task:a#3"])

        let next = hub.publish([event("task:b", 2), event("task:c", 1)], now: 2)
        #expect(deliveries(next).map(\.1) == [2])  // task:c has no subscriber
        #expect(hub.subscribe(sub(0, 2), to: "task:c", resume: nil, now: 3).seq == 1)
        #expect(hub.subscribe(sub(0, 2), to: "task:a", resume: nil, now: 3).seq == 3)
        #expect(hub.subscribe(sub(0, 2), to: "task:b", resume: nil, now: 3).seq == 2)
    }

    @Test("an event frame is a text frame of {\"seq\":N, followed by the emitted bytes after {")
    func frameIsSeqPlusOriginalBytes() throws {
        let hub = makeHub()
        let watcher = sub(0, 1)
        _ = hub.subscribe(watcher, to: "task:1", resume: nil, now: 0)
        // Odd spacing, escapes, nesting and non-ASCII are delivered exactly as they were written.
        let objects = [
            #"{"topic":"task:1"}"#,
            #"{ "topic" : "task:1" , "type":"progress","progress":60,"message":"3/5"  }"#,
            #"{"topic":"task:1","msg":"caf\u00e9 \"quoted\" \\ é ✓","nested":{"a":[1,2.5e3,null,true]}}"#,
        ]
        let plan = hub.publish(objects.map { rawEvent("task:1", $0) }, now: 1)
        let frames = runs(plan.loops[0]).flatMap(\.frames)
        try #require(frames.count == 3)
        for (index, frame) in frames.enumerated() {
            let decoded = try #require(decode(frame))
            #expect(decoded.byte0 == 0x81, "FIN + text opcode")
            #expect(decoded.payload == expectedPayload(seq: UInt64(index + 1), object: objects[index]))
        }
        #expect(decode(frames[0])?.text == #"{"seq":1,"topic":"task:1"}"#)
    }

    @Test(
        "payload length is encoded in 7, 16 or 64 bits, the shortest that fits",
        arguments: [1, 40, 125, 126, 127, 1000, 65535, 65536, 70_000, 200_000])
    func lengthEncodings(payloadLength: Int) throws {
        // Payload = `{"seq":1,` (9 bytes) + the object after its `{`.
        let base = #"{"topic":"t","p":""}"#
        let baseLength = 9 + base.utf8.count - 1
        let target = max(payloadLength, baseLength)
        let object = #"{"topic":"t","p":""# + String(repeating: "x", count: target - baseLength) + #""}"#

        let hub = makeHub()
        _ = hub.subscribe(sub(0, 1), to: "t", resume: nil, now: 0)
        let plan = hub.publish([rawEvent("t", object)], now: 1)
        let frame = try #require(runs(plan.loops[0]).first?.frames.first)
        let decoded = try #require(decode(frame))
        #expect(decoded.byte0 == 0x81)
        #expect(decoded.payload.count == target)
        #expect(decoded.headerLength == (target < 126 ? 2 : target <= 0xFFFF ? 4 : 10))
        #expect(decoded.payload == expectedPayload(seq: 1, object: object))
        // The frame, its history copy and the newest sent on subscribe are the same bytes.
        let later = hub.subscribe(sub(0, 2), to: "t", resume: nil, now: 2)
        #expect(later.frames.map(bytes) == [bytes(frame)])
    }

    @Test("seq with many digits is written correctly")
    func manyDigitSeq() throws {
        let hub = makeHub(historyLimit: 0)
        let watcher = sub(0, 1)
        _ = hub.subscribe(watcher, to: "t", resume: nil, now: 0)
        var last: ByteBuffer?
        for round in 0..<12 {
            let plan = hub.publish((0..<1000).map { event("t", round * 1000 + $0) }, now: UInt64(round))
            last = runs(plan.loops[0]).last?.frames.last
        }
        let frame = try #require(last)
        #expect(decode(frame)?.text.hasPrefix("{\"seq\":12000,\"topic\":\"t\"") == true)
    }
}
