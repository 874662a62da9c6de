// Tests of the Hub alone: numbering, frames, history and resume, fan-out plans,
// patterns, forgetting topics (--max-topics, --topic-ttl), and the state file.
//
// Contract references are to docs/protocol.md (the command line, ingest and delivery sections).

import Foundation
import NIOCore
import Testing

@testable import RelayHub

// MARK: - Helpers

private func makeHub(
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
private func object(_ topic: String, _ n: Int = 0, extra: String = "") -> String {
    #"{"topic":"\#(topic)","type":"progress","n":\#(n)\#(extra)}"#
}

private func event(_ topic: String, _ n: Int = 0, extra: String = "") -> IncomingEvent {
    IncomingEvent(topic: topic, object: ByteBuffer(string: object(topic, n, extra: extra)))
}

private func rawEvent(_ topic: String, _ object: String) -> IncomingEvent {
    IncomingEvent(topic: topic, object: ByteBuffer(string: object))
}

/// What the payload of the frame for `object` numbered `seq` must be: `{"seq":N,` + the object after its `{`.
private func expectedPayload(seq: UInt64, object: String) -> [UInt8] {
    Array("{\"seq\":\(seq),".utf8) + Array(object.utf8.dropFirst())
}

/// A decoded server-to-client WebSocket frame.
private struct DecodedFrame: Equatable {
    var byte0: UInt8
    var headerLength: Int
    var payload: [UInt8]
    var text: String { String(decoding: payload, as: UTF8.self) }
}

/// Decodes a whole, unmasked frame per RFC 6455 section 5.2; nil (with an issue) when it is not one.
private func decode(
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
private func seq(of frame: ByteBuffer) -> UInt64? {
    guard let decoded = decode(frame) else { return nil }
    let text = decoded.text
    guard text.hasPrefix("{\"seq\":") else { return nil }
    let digits = text.dropFirst(7).prefix { $0.isNumber }
    return UInt64(digits)
}

private func seqs(_ frames: [ByteBuffer]) -> [UInt64?] { frames.map(seq(of:)) }

/// The `"topic"` value of an event frame made by `object(_:_:)`.
private func topic(of frame: ByteBuffer) -> String? {
    guard let text = decode(frame)?.text, let start = text.firstRange(of: "\"topic\":\"")?.upperBound,
        let end = text[start...].firstIndex(of: "\"")
    else { return nil }
    return String(text[start..<end])
}

private func bytes(_ buffer: ByteBuffer) -> [UInt8] { Array(buffer.readableBytesView) }

private func sub(_ loop: Int, _ serial: UInt64) -> SubscriberID { SubscriberID(loop: loop, serial: serial) }

/// One run of a loop's plan, materialised for checking.
private struct Run {
    var frames: [ByteBuffer]
    var subscribers: [SubscriberID]
}

private func runs(_ plan: LoopPlan) -> [Run] {
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
private func deliveries(_ plan: FanOut) -> [(SubscriberID, UInt64?, String?)] {
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
private func topicNames(_ hub: Hub) -> Set<String> { Set(hub.snapshot().map(\.name)) }

// MARK: - Numbering and frames

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

// MARK: - History and resume

@Suite("Hub: history and resume")
struct HubHistoryTests {
    /// A hub with `count` events on "task:1", and their frames in order.
    private func filled(historyLimit: Int, count: Int) -> (Hub, [ByteBuffer], String) {
        let hub = makeHub(historyLimit: historyLimit)
        let recorder = sub(0, 999)
        let first = hub.subscribe(recorder, to: "task:1", resume: nil, now: 0)
        var frames: [ByteBuffer] = []
        for n in 1...count {
            let plan = hub.publish([event("task:1", n)], now: UInt64(n))
            frames += runs(plan.loops[0]).flatMap(\.frames)
        }
        hub.unsubscribe(recorder, from: "task:1", now: UInt64(count))
        return (hub, frames, first.epoch ?? "")
    }

    @Test("resume inside the window replays exactly the missed frames, in order")
    func resumeInsideWindow() throws {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        #expect(frames.count == 12)

        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 9), now: 100)
        #expect(answer.epoch == epoch)
        #expect(answer.seq == 12)
        #expect(answer.recovered)
        #expect(answer.frames.map(bytes) == frames[9...].map(bytes))
        #expect(seqs(answer.frames) == [10, 11, 12])

        // The oldest resumable point: history holds seq 8...12, so since 7 still recovers all five.
        let oldest = hub.subscribe(sub(0, 2), to: "task:1", resume: ResumePoint(epoch: epoch, since: 7), now: 100)
        #expect(oldest.recovered)
        #expect(seqs(oldest.frames) == [8, 9, 10, 11, 12])
        #expect(oldest.frames.map(bytes) == frames[7...].map(bytes))
    }

    @Test("resume at the newest seq: recovered, nothing to send")
    func resumeAtNewest() {
        let (hub, _, epoch) = filled(historyLimit: 5, count: 12)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 12), now: 100)
        #expect(answer.recovered)
        #expect(answer.seq == 12)
        #expect(answer.frames.isEmpty)
    }

    @Test("resume older than the window: not recovered, newest only")
    func resumeOlderThanWindow() throws {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        for since: UInt64 in [0, 1, 6] {
            let answer = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: since), now: 100)
            #expect(!answer.recovered, "since \(since)")
            #expect(answer.seq == 12)
            #expect(answer.frames.map(bytes) == [bytes(frames[11])], "since \(since)")
        }
    }

    @Test("history keeps exactly historyLimit events")
    func historyKeepsExactlyTheLimit() {
        for limit in [1, 2, 5, 100] {
            let (hub, _, epoch) = filled(historyLimit: limit, count: limit + 3)
            let total = UInt64(limit + 3)
            let edge = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: total - UInt64(limit)), now: 100)
            #expect(edge.recovered, "limit \(limit)")
            #expect(edge.frames.count == limit, "limit \(limit)")
            let beyond = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: total - UInt64(limit) - 1),
                now: 100)
            #expect(!beyond.recovered, "limit \(limit)")
            #expect(beyond.frames.count == 1, "limit \(limit)")
            #expect(hub.snapshot().first?.history.count == limit)
        }
    }

    @Test("resume with since 0 while history still holds seq 1: everything is replayed")
    func resumeFromZero() {
        let (hub, frames, epoch) = filled(historyLimit: 10, count: 4)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 0), now: 100)
        #expect(answer.recovered)
        #expect(answer.frames.map(bytes) == frames.map(bytes))
    }

    @Test("resume with another epoch: not recovered, newest only")
    func wrongEpoch() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        let answer = hub.subscribe(
            sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch + "x", since: 11), now: 100)
        #expect(!answer.recovered)
        #expect(answer.epoch == epoch)
        #expect(answer.frames.map(bytes) == [bytes(frames[11])])
    }

    @Test("resume with since beyond the newest seq: not recovered, newest only")
    func sinceInTheFuture() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 3)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 7), now: 100)
        #expect(!answer.recovered)
        #expect(answer.frames.map(bytes) == [bytes(frames[2])])
    }

    @Test("history 0 still keeps the newest event")
    func historyZero() {
        let (hub, frames, epoch) = filled(historyLimit: 0, count: 3)
        let plain = hub.subscribe(sub(0, 1), to: "task:1", resume: nil, now: 100)
        #expect(!plain.recovered)
        #expect(plain.seq == 3)
        #expect(plain.frames.map(bytes) == [bytes(frames[2])])

        let missed = hub.subscribe(sub(0, 2), to: "task:1", resume: ResumePoint(epoch: epoch, since: 2), now: 100)
        #expect(!missed.recovered)
        #expect(missed.frames.map(bytes) == [bytes(frames[2])])

        let current = hub.subscribe(sub(0, 3), to: "task:1", resume: ResumePoint(epoch: epoch, since: 3), now: 100)
        #expect(current.recovered)
        #expect(current.frames.isEmpty)

        let state = hub.snapshot()
        #expect(state.count == 1)
        #expect(state.first?.history.isEmpty == true)
        #expect(state.first?.newest.map(bytes) == Array(expectedPayload(seq: 3, object: object("task:1", 3))))
    }

    @Test("plain subscribe: subscribed with the newest seq, then the newest event")
    func plainSubscribeGetsNewest() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 4)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: nil, now: 100)
        #expect(answer.epoch == epoch)
        #expect(answer.seq == 4)
        #expect(!answer.recovered)
        #expect(answer.frames.map(bytes) == [bytes(frames[3])])
    }

    @Test("subscribing to a topic with no event: its epoch, seq 0, no frames")
    func newTopicOnSubscribe() {
        let hub = makeHub()
        let answer = hub.subscribe(sub(0, 1), to: "task:new", resume: nil, now: 0)
        #expect(answer.epoch != nil)
        #expect(answer.epoch?.isEmpty == false)
        #expect(answer.seq == 0)
        #expect(!answer.recovered)
        #expect(answer.frames.isEmpty)
        #expect(hub.counts == HubCounts(topics: 1, subscriptions: 1, patterns: 0))

        // The first event then gets seq 1 in that same epoch, and is delivered live.
        let plan = hub.publish([event("task:new", 1)], now: 1)
        #expect(deliveries(plan).map(\.1) == [1])
        let again = hub.subscribe(sub(0, 2), to: "task:new", resume: nil, now: 2)
        #expect(again.epoch == answer.epoch)
        #expect(again.seq == 1)
    }

    @Test("every topic gets its own epoch")
    func epochsDiffer() {
        let hub = makeHub()
        _ = hub.publish([event("a"), event("b")], now: 0)
        let a = hub.subscribe(sub(0, 1), to: "a", resume: nil, now: 1).epoch
        let b = hub.subscribe(sub(0, 1), to: "b", resume: nil, now: 1).epoch
        #expect(a != nil && b != nil && a != b)
    }
}

// MARK: - Fan-out

@Suite("Hub: fan-out plan")
struct HubFanOutTests {
    @Test("subscribers grouped by loop; consecutive events of a topic share one delivery")
    func groupedAndCoalesced() throws {
        let hub = makeHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        let c = sub(0, 3)
        let d = sub(1, 4)
        for id in [a, b, c] { _ = hub.subscribe(id, to: "t1", resume: nil, now: 0) }
        _ = hub.subscribe(d, to: "t2", resume: nil, now: 0)
        _ = hub.publish([event("t0", 0)], now: 0)  // nobody listens

        let plan = hub.publish(
            [event("t1", 1), event("t1", 2), event("t2", 1), event("t1", 3), event("t0", 1)], now: 1)
        try #require(plan.loops.count == 2)

        let loop0 = runs(plan.loops[0])
        try #require(loop0.count == 2)
        #expect(Set(loop0[0].subscribers) == [a, c])
        #expect(loop0[0].subscribers.count == 2)
        #expect(seqs(loop0[0].frames) == [1, 2])
        #expect(loop0[0].frames.map(topic(of:)) == ["t1", "t1"])
        #expect(Set(loop0[1].subscribers) == [a, c])
        #expect(seqs(loop0[1].frames) == [3])

        let loop1 = runs(plan.loops[1])
        try #require(loop1.count == 3)
        #expect(loop1[0].subscribers == [b])
        #expect(seqs(loop1[0].frames) == [1, 2])
        #expect(loop1[1].subscribers == [d])
        #expect(loop1[1].frames.map(topic(of:)) == ["t2"])
        #expect(seqs(loop1[1].frames) == [1])
        #expect(loop1[2].subscribers == [b])
        #expect(seqs(loop1[2].frames) == [3])

        // The same frame bytes go to both loops.
        #expect(loop0[0].frames.map(bytes) == loop1[0].frames.map(bytes))
        // t1: 3 events x 3 subscribers; t2: 1 x 1; t0: nobody.
        #expect(plan.deliveryCount == 10)
    }

    @Test("a batch nobody listens to has an empty plan")
    func nobodyListening() {
        let hub = makeHub(loopCount: 3)
        let plan = hub.publish([event("x", 1), event("y", 1)], now: 0)
        #expect(plan.loops.count == 3)
        #expect(plan.loops.allSatisfy { $0.isEmpty })
        #expect(plan.deliveryCount == 0)
    }

    @Test("a loop plan holds each frame once; one subscriber needs no array, several share the topic's")
    func loopPlanLayout() {
        let hub = makeHub(loopCount: 1)
        let a = sub(0, 1)
        let b = sub(0, 2)
        _ = hub.subscribe(a, to: "solo", resume: nil, now: 0)
        _ = hub.subscribe(a, to: "pair", resume: nil, now: 0)
        _ = hub.subscribe(b, to: "pair", resume: nil, now: 0)
        let plan = hub.publish([event("solo", 1), event("solo", 2), event("pair", 1), event("solo", 3)], now: 1)
        let loop = plan.loops[0]
        #expect(loop.frames.count == 4)
        #expect(loop.runs.map(\.end) == [2, 3, 4])
        #expect(loop.runs.map(\.targets) == [.one(a), .many([a, b]), .one(a)])
        #expect(plan.deliveryCount == 5)
    }

    @Test("subscribing twice to one topic still means one delivery per event")
    func doubleSubscribe() {
        let hub = makeHub()
        let a = sub(0, 1)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        #expect(hub.counts.subscriptions == 1)
        let plan = hub.publish([event("t", 1)], now: 1)
        #expect(plan.deliveryCount == 1)
        #expect(runs(plan.loops[0]).first?.subscribers == [a])
    }

    @Test("unsubscribe stops delivery")
    func unsubscribeStops() {
        let hub = makeHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        _ = hub.subscribe(b, to: "t", resume: nil, now: 0)
        #expect(hub.publish([event("t", 1)], now: 1).deliveryCount == 2)

        #expect(hub.unsubscribe(a, from: "t", now: 2))
        #expect(!hub.unsubscribe(a, from: "t", now: 2), "a second unsubscribe holds nothing")
        #expect(!hub.unsubscribe(a, from: "never", now: 2))
        let plan = hub.publish([event("t", 2)], now: 3)
        #expect(plan.deliveryCount == 1)
        #expect(runs(plan.loops[0]).isEmpty)
        #expect(runs(plan.loops[1]).first?.subscribers == [b])
        #expect(hub.counts.subscriptions == 1)

        #expect(hub.unsubscribe(b, from: "t", now: 4))
        #expect(hub.publish([event("t", 3)], now: 5).deliveryCount == 0)
        #expect(hub.counts.subscriptions == 0)
    }

    @Test("unsubscribe(fromAll:) ends every subscription of a connection, patterns too")
    func unsubscribeFromAll() {
        let hub = makeHub(loopCount: 2)
        let gone = sub(1, 7)
        let stays = sub(0, 8)
        for name in ["t1", "t2", "job:*"] { _ = hub.subscribe(gone, to: name, resume: nil, now: 0) }
        _ = hub.subscribe(stays, to: "t1", resume: nil, now: 0)
        #expect(hub.counts == HubCounts(topics: 2, subscriptions: 4, patterns: 1))

        hub.unsubscribe(gone, fromAll: ["t1", "t2", "job:*", "not-held"], now: 1)
        #expect(hub.counts == HubCounts(topics: 2, subscriptions: 1, patterns: 0))
        let plan = hub.publish([event("t1", 1), event("t2", 1), event("job:1", 1)], now: 2)
        #expect(deliveries(plan).map(\.0) == [stays])
        #expect(plan.deliveryCount == 1)
    }
}

// MARK: - Patterns

@Suite("Hub: pattern subscriptions")
struct HubPatternTests {
    @Test("a pattern gets live events of matching topics only")
    func liveEvents() {
        let hub = makeHub(loopCount: 2)
        let tasks = sub(0, 1)
        let everything = sub(1, 2)
        let tasksAnswer = hub.subscribe(tasks, to: "task:*", resume: nil, now: 0)
        let allAnswer = hub.subscribe(everything, to: "*", resume: nil, now: 0)
        #expect(tasksAnswer.epoch == nil && tasksAnswer.seq == 0 && !tasksAnswer.recovered)
        #expect(tasksAnswer.frames.isEmpty && allAnswer.frames.isEmpty)
        #expect(hub.counts == HubCounts(topics: 0, subscriptions: 2, patterns: 2))

        let plan = hub.publish(
            [event("task:1", 1), event("job:1", 1), event("task", 1), event("tasks:1", 1), event("task:", 1)],
            now: 1)
        let got = deliveries(plan)
        #expect(got.filter { $0.0 == tasks }.map(\.2) == ["task:1", "task:"])
        #expect(got.filter { $0.0 == everything }.map(\.2) == ["task:1", "job:1", "task", "tasks:1", "task:"])
        #expect(plan.deliveryCount == 7)

        // A topic that first appears after the pattern subscription is matched too.
        let later = hub.publish([event("task:new", 1)], now: 2)
        #expect(Set(deliveries(later).map(\.0)) == [tasks, everything])
    }

    @Test("pattern snapshot: the newest event of each matching topic, most recently updated first")
    func snapshotOrder() {
        let hub = makeHub()
        _ = hub.publish([event("job:1", 1)], now: 10)
        _ = hub.publish([event("task:1", 1)], now: 20)
        _ = hub.publish([event("task:2", 1)], now: 30)
        _ = hub.publish([event("task:1", 2)], now: 40)
        _ = hub.publish([event("task:3", 1)], now: 50)
        _ = hub.subscribe(sub(0, 9), to: "task:empty", resume: nil, now: 50)  // a topic with no event

        let tasks = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 60)
        #expect(tasks.epoch == nil)
        #expect(tasks.seq == 0)
        #expect(!tasks.recovered)
        #expect(tasks.frames.map(topic(of:)) == ["task:3", "task:1", "task:2"])
        #expect(seqs(tasks.frames) == [1, 2, 1])

        let all = hub.subscribe(sub(0, 2), to: "*", resume: nil, now: 60)
        #expect(all.frames.map(topic(of:)) == ["task:3", "task:1", "task:2", "job:1"])

        // A pattern takes no resume: the same snapshot, not recovered.
        let resumed = hub.subscribe(
            sub(0, 3), to: "task:*", resume: ResumePoint(epoch: "test-1", since: 0), now: 60)
        #expect(!resumed.recovered && resumed.epoch == nil && resumed.seq == 0)
        #expect(resumed.frames.map(topic(of:)) == ["task:3", "task:1", "task:2"])
    }

    @Test("pattern snapshot holds at most patternSnapshotLimit topics, the most recent")
    func snapshotLimit() {
        let hub = makeHub(patternSnapshotLimit: 3)
        for n in 0..<10 { _ = hub.publish([event("task:\(n)", n)], now: UInt64(100 + n)) }
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 200)
        #expect(answer.frames.map(topic(of:)) == ["task:9", "task:8", "task:7"])
    }

    @Test("the default snapshot bound is 1000")
    func defaultSnapshotBound() {
        let hub = makeHub()
        #expect(hub.configuration.patternSnapshotLimit == 1000)
        for n in 0..<1200 { _ = hub.publish([event("t:\(n)", n)], now: UInt64(n + 1)) }
        let answer = hub.subscribe(sub(0, 1), to: "t:*", resume: nil, now: 5000)
        #expect(answer.frames.count == 1000)
        #expect(answer.frames.first.flatMap(topic(of:)) == "t:1199")
        #expect(answer.frames.last.flatMap(topic(of:)) == "t:200")
    }

    // Events of one publish batch share their `now`; the later one in the batch is still the more
    // recently updated. Contract 5: "the newest event of each matching topic (at most 1000, the most
    // recently updated first)".
    @Test("pattern snapshot orders topics updated in one batch by their order in the batch")
    func snapshotOrderWithinOneBatch() {
        let hub = makeHub()
        let names = (0..<30).map { "task:\($0)" }
        _ = hub.publish(names.map { event($0, 1) }, now: 7)
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 8)
        #expect(answer.frames.map(topic(of:)) == names.reversed().map(Optional.some))
    }

    @Test("pattern snapshot limit within one batch keeps the topics updated last")
    func snapshotLimitWithinOneBatch() {
        let hub = makeHub(patternSnapshotLimit: 5)
        let names = (0..<50).map { "task:\($0)" }
        _ = hub.publish(names.map { event($0, 1) }, now: 7)
        _ = hub.publish([event("task:3", 2)], now: 7)
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 8)
        #expect(answer.frames.map(topic(of:)) == ["task:3", "task:49", "task:48", "task:47", "task:46"])
    }

    @Test("a subscriber holding an exact and matching patterns is listed once per event")
    func listedOnce() {
        let hub = makeHub(loopCount: 2)
        let s = sub(1, 5)
        let other = sub(0, 6)
        _ = hub.subscribe(s, to: "task:1", resume: nil, now: 0)
        _ = hub.subscribe(s, to: "task:*", resume: nil, now: 0)
        _ = hub.subscribe(s, to: "*", resume: nil, now: 0)
        _ = hub.subscribe(other, to: "task:*", resume: nil, now: 0)

        let plan = hub.publish([event("task:1", 1), event("task:1", 2), event("task:2", 1)], now: 1)
        #expect(runs(plan.loops[1]).count == 2)
        #expect(runs(plan.loops[1])[0].subscribers == [s])
        #expect(seqs(runs(plan.loops[1])[0].frames) == [1, 2])
        #expect(runs(plan.loops[1])[1].subscribers == [s])
        #expect(runs(plan.loops[0]).map(\.subscribers) == [[other], [other]])
        #expect(plan.deliveryCount == 6)

        // Dropping the exact subscription leaves the patterns.
        hub.unsubscribe(s, from: "task:1", now: 2)
        #expect(hub.publish([event("task:1", 3)], now: 3).deliveryCount == 2)
        // Dropping the patterns leaves nothing for s.
        #expect(hub.unsubscribe(s, from: "task:*", now: 4))
        #expect(hub.unsubscribe(s, from: "*", now: 4))
        #expect(!hub.unsubscribe(s, from: "*", now: 4))
        let last = hub.publish([event("task:1", 4)], now: 5)
        #expect(deliveries(last).map(\.0) == [other])
    }

    @Test("unsubscribing a pattern stops its live events")
    func patternUnsubscribe() {
        let hub = makeHub()
        let p = sub(0, 1)
        _ = hub.subscribe(p, to: "job:*", resume: nil, now: 0)
        #expect(hub.publish([event("job:1", 1)], now: 1).deliveryCount == 1)
        #expect(hub.unsubscribe(p, from: "job:*", now: 2))
        #expect(hub.publish([event("job:1", 2)], now: 3).deliveryCount == 0)
        #expect(hub.counts == HubCounts(topics: 1, subscriptions: 0, patterns: 0))
    }
}

// MARK: - Forgetting topics

@Suite("Hub: max topics and TTL")
struct HubBoundsTests {
    @Test("beyond maxTopics the longest idle topics are forgotten")
    func maxTopicsForgetsLongestIdle() {
        let hub = makeHub(maxTopics: 10)
        for n in 0..<30 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        #expect(hub.counts.topics == 10)
        #expect(topicNames(hub) == Set((20..<30).map { "t\($0)" }))
    }

    @Test("an event makes a topic recently active again")
    func eventRefreshesActivity() {
        let hub = makeHub(maxTopics: 10)
        for n in 0..<10 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        _ = hub.publish([event("t0", 99)], now: 10)
        _ = hub.publish([event("t10", 1)], now: 11)
        #expect(hub.counts.topics == 10)
        #expect(!topicNames(hub).contains("t1"))
        #expect(topicNames(hub).contains("t0"))
    }

    @Test("a topic with a subscriber is never forgotten")
    func subscribedTopicKept() {
        let hub = makeHub(maxTopics: 10)
        _ = hub.subscribe(sub(0, 1), to: "t0", resume: nil, now: 0)
        for n in 0..<30 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        #expect(hub.counts.topics == 10)
        #expect(topicNames(hub) == Set(["t0"] + (21..<30).map { "t\($0)" }))
        // Also when the subscribed topic has no event at all.
        let empty = makeHub(maxTopics: 3)
        let first = empty.subscribe(sub(0, 1), to: "waiting", resume: nil, now: 0)
        for n in 0..<10 { _ = empty.publish([event("t\(n)", n)], now: UInt64(n + 1)) }
        #expect(empty.counts.topics == 3)
        let again = empty.subscribe(sub(0, 2), to: "waiting", resume: nil, now: 20)
        #expect(again.epoch == first.epoch)
    }

    @Test("a topic whose last subscriber left counts as idle from then")
    func unsubscribeStartsIdleness() {
        let hub = makeHub(maxTopics: 5)
        _ = hub.subscribe(sub(0, 1), to: "t0", resume: nil, now: 0)
        for n in 0..<5 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        hub.unsubscribe(sub(0, 1), from: "t0", now: 10)  // t0 is now the most recently active
        _ = hub.publish([event("t5", 5)], now: 11)
        _ = hub.publish([event("t6", 6)], now: 12)
        #expect(hub.counts.topics == 5)
        #expect(topicNames(hub) == ["t0", "t3", "t4", "t5", "t6"])
    }

    @Test("a forgotten topic that comes back gets a new epoch and restarts at seq 1")
    func forgottenTopicComesBack() throws {
        let hub = makeHub(maxTopics: 1)
        _ = hub.publish([event("a", 1), event("a", 2)], now: 1)
        let old = try #require(hub.subscribe(sub(0, 1), to: "a", resume: nil, now: 2).epoch)
        hub.unsubscribe(sub(0, 1), from: "a", now: 2)
        _ = hub.publish([event("b", 1)], now: 3)
        #expect(topicNames(hub) == ["b"])

        _ = hub.publish([event("a", 3)], now: 4)
        let back = hub.subscribe(sub(0, 1), to: "a", resume: ResumePoint(epoch: old, since: 2), now: 5)
        #expect(back.epoch != nil)
        #expect(back.epoch != old)
        #expect(back.seq == 1)
        #expect(!back.recovered)
        #expect(seqs(back.frames) == [1])
        #expect(back.frames.first.flatMap { decode($0)?.text } == #"{"seq":1,"topic":"a","type":"progress","n":3}"#)
    }

    @Test("topicTTL: a topic with no event and no subscriber for that long is forgotten")
    func ttlExpiry() {
        let hub = makeHub(topicTTL: 100)
        _ = hub.publish([event("a", 1)], now: 1000)
        _ = hub.publish([event("b", 1)], now: 1050)
        _ = hub.subscribe(sub(0, 1), to: "c", resume: nil, now: 1000)
        _ = hub.publish([event("c", 1)], now: 1000)

        #expect(hub.expire(now: 1099) == 0)
        #expect(hub.counts.topics == 3)
        #expect(hub.expire(now: 1100) == 1)  // exactly the TTL is "for this long"
        #expect(topicNames(hub) == ["b", "c"])
        #expect(hub.expire(now: 1149) == 0)
        #expect(hub.expire(now: 1150) == 1)
        #expect(topicNames(hub) == ["c"])

        // c has a subscriber: kept however long; once it leaves, the TTL runs from then.
        #expect(hub.expire(now: 1_000_000) == 0)
        hub.unsubscribe(sub(0, 1), from: "c", now: 2_000_000)
        #expect(hub.expire(now: 2_000_099) == 0)
        #expect(hub.expire(now: 2_000_100) == 1)
        #expect(hub.counts.topics == 0)
    }

    @Test("topicTTL: an event restarts the clock")
    func ttlRestartsOnEvent() {
        let hub = makeHub(topicTTL: 100)
        _ = hub.publish([event("d", 1)], now: 0)
        _ = hub.publish([event("d", 2)], now: 80)
        #expect(hub.expire(now: 150) == 0)
        #expect(hub.expire(now: 179) == 0)
        #expect(hub.expire(now: 180) == 1)
    }

    @Test("topicTTL: a topic that only had a subscriber expires after it leaves")
    func ttlTopicWithoutEvents() {
        let hub = makeHub(topicTTL: 100)
        let first = hub.subscribe(sub(0, 1), to: "quiet", resume: nil, now: 0)
        hub.unsubscribe(sub(0, 1), from: "quiet", now: 50)
        #expect(hub.expire(now: 149) == 0)
        #expect(hub.counts.topics == 1)
        #expect(hub.expire(now: 150) == 1)
        #expect(hub.counts.topics == 0)
        let again = hub.subscribe(sub(0, 1), to: "quiet", resume: nil, now: 200)
        #expect(again.epoch != first.epoch)
    }

    @Test("topicTTL: an expired topic that comes back gets a new epoch")
    func ttlNewEpoch() throws {
        let hub = makeHub(topicTTL: 10)
        _ = hub.publish([event("e", 1)], now: 0)
        let old = try #require(hub.subscribe(sub(0, 1), to: "e", resume: nil, now: 1).epoch)
        hub.unsubscribe(sub(0, 1), from: "e", now: 1)
        #expect(hub.expire(now: 11) == 1)
        _ = hub.publish([event("e", 2)], now: 12)
        let back = hub.subscribe(sub(0, 1), to: "e", resume: ResumePoint(epoch: old, since: 1), now: 13)
        #expect(back.epoch != old)
        #expect(back.seq == 1)
        #expect(!back.recovered)
    }

    // One million topics take about 10 s in a debug build on a 2-core machine, so by default the test
    // publishes 200,000 (about 2 s); set PROGRESS_RELAY_TEST_MILLION=1 for the full million.
    static let distinctTopics = ProcessInfo.processInfo.environment["PROGRESS_RELAY_TEST_MILLION"] == nil
        ? 200_000 : 1_000_000

    @Test("hundreds of thousands of distinct topics with maxTopics 1000 keep at most 1000 topics")
    func manyDistinctTopics() {
        let total = Self.distinctTopics
        let hub = makeHub(historyLimit: 1, maxTopics: 1000)
        let batch = 10_000
        // The hub never reads the topic back out of the object, so one shared buffer serves every event.
        let object = ByteBuffer(string: #"{"topic":"t","type":"progress"}"#)
        var n = 0
        var now: UInt64 = 0
        while n < total {
            var events: [IncomingEvent] = []
            events.reserveCapacity(batch)
            for k in n..<(n + batch) {
                events.append(IncomingEvent(topic: "t:" + String(k), object: object))
            }
            now += 1
            _ = hub.publish(events, now: now)
            n += batch
            if hub.counts.topics > 1000 {
                Issue.record("\(hub.counts.topics) topics after \(n) events")
                return
            }
        }
        #expect(hub.counts.topics == 1000)
        #expect(topicNames(hub) == Set((total - 1000..<total).map { "t:\($0)" }))
    }
}

// MARK: - State

@Suite("Hub: snapshot, restore and the state file")
struct HubStateTests {
    /// A hub with "t1" (8 events), "t2" (2 events) and "quiet" (a subscriber, no event).
    private func populated(historyLimit: Int) -> (Hub, [String: [ByteBuffer]], [String: String]) {
        let hub = makeHub(historyLimit: historyLimit)
        let recorder = sub(0, 1)
        var epochs: [String: String] = [:]
        for name in ["t1", "t2"] { epochs[name] = hub.subscribe(recorder, to: name, resume: nil, now: 0).epoch }
        _ = hub.subscribe(sub(0, 2), to: "quiet", resume: nil, now: 0)
        var frames: [String: [ByteBuffer]] = [:]
        var now: UInt64 = 1
        for (name, n) in [("t1", 1), ("t1", 2), ("t2", 1), ("t1", 3), ("t1", 4), ("t1", 5), ("t1", 6), ("t2", 2),
            ("t1", 7), ("t1", 8)]
        {
            let plan = hub.publish([event(name, n)], now: now)
            frames[name, default: []] += runs(plan.loops[0]).flatMap(\.frames)
            now += 1
        }
        return (hub, frames, epochs)
    }

    @Test("snapshot holds each topic that had an event: epoch, seq, history payloads, newest")
    func snapshotContents() throws {
        let (hub, frames, epochs) = populated(historyLimit: 5)
        let states = hub.snapshot()
        #expect(states.map(\.name) == ["t2", "t1"], "oldest event first; the topic with no event left out")
        let t1 = try #require(states.first { $0.name == "t1" })
        #expect(t1.epoch == epochs["t1"])
        #expect(t1.seq == 8)
        #expect(t1.history.map(bytes) == (4...8).map { expectedPayload(seq: UInt64($0), object: object("t1", $0)) })
        #expect(t1.newest.map(bytes) == expectedPayload(seq: 8, object: object("t1", 8)))
        #expect(t1.history.map(bytes) == frames["t1"]![3...].compactMap { decode($0)?.payload })
        let t2 = try #require(states.first { $0.name == "t2" })
        #expect(t2.seq == 2)
        #expect(t2.history.count == 2)
    }

    @Test("restore keeps epoch, seq and history; resume with the old epoch works")
    func restoreRoundTrip() throws {
        let (hub, frames, epochs) = populated(historyLimit: 5)
        let restarted = makeHub(historyLimit: 5, epochPrefix: "test-restart")
        restarted.restore(hub.snapshot(), now: 500)
        #expect(restarted.counts.topics == 2)

        let t1 = restarted.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 5), now: 501)
        #expect(t1.epoch == epochs["t1"])
        #expect(t1.seq == 8)
        #expect(t1.recovered)
        #expect(t1.frames.map(bytes) == frames["t1"]![5...].map(bytes), "replayed frames are byte-identical")

        let oldest = restarted.subscribe(
            sub(0, 2), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 3), now: 501)
        #expect(oldest.recovered)
        #expect(seqs(oldest.frames) == [4, 5, 6, 7, 8])
        let tooOld = restarted.subscribe(
            sub(0, 3), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 2), now: 501)
        #expect(!tooOld.recovered)
        #expect(tooOld.frames.map(bytes) == [bytes(frames["t1"]![7])])

        let t2 = restarted.subscribe(sub(0, 1), to: "t2", resume: nil, now: 501)
        #expect(t2.epoch == epochs["t2"])
        #expect(t2.seq == 2)
        #expect(t2.frames.map(bytes) == [bytes(frames["t2"]![1])])

        // Numbering goes on in the same epoch.
        let plan = restarted.publish([event("t1", 9)], now: 502)
        #expect(seqs(runs(plan.loops[0]).flatMap(\.frames)) == [9])
        let after = restarted.subscribe(sub(0, 4), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 8), now: 503)
        #expect(after.recovered)
        #expect(seqs(after.frames) == [9])
        #expect(after.epoch == epochs["t1"])

        // The restored state snapshots the same again (t1 has moved on by one event).
        let again = restarted.snapshot().first { $0.name == "t2" }
        #expect(again == hub.snapshot().first { $0.name == "t2" })
    }

    @Test("restore into a smaller history keeps the newest events")
    func restoreIntoSmallerHistory() {
        let (hub, frames, epochs) = populated(historyLimit: 5)
        let restarted = makeHub(historyLimit: 3, epochPrefix: "test-restart")
        restarted.restore(hub.snapshot(), now: 500)
        let inside = restarted.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 5), now: 501)
        #expect(inside.recovered)
        #expect(inside.frames.map(bytes) == frames["t1"]![5...].map(bytes))
        let outside = restarted.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 4), now: 501)
        #expect(!outside.recovered)
        #expect(restarted.snapshot().first { $0.name == "t1" }?.history.count == 3)
    }

    @Test("history 0: snapshot and restore keep the newest event only")
    func restoreNewestOnly() throws {
        let (hub, frames, epochs) = populated(historyLimit: 0)
        let states = hub.snapshot()
        let t1 = try #require(states.first { $0.name == "t1" })
        #expect(t1.history.isEmpty)
        #expect(t1.newest.map(bytes) == decode(frames["t1"]![7])?.payload)

        let restarted = makeHub(historyLimit: 0, epochPrefix: "test-restart")
        restarted.restore(states, now: 500)
        let plain = restarted.subscribe(sub(0, 1), to: "t1", resume: nil, now: 501)
        #expect(plain.epoch == epochs["t1"])
        #expect(plain.seq == 8)
        #expect(plain.frames.map(bytes) == [bytes(frames["t1"]![7])])
        let current = restarted.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 8), now: 501)
        #expect(current.recovered)
        #expect(current.frames.isEmpty)
        let behind = restarted.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 7), now: 501)
        #expect(!behind.recovered)
        #expect(behind.frames.map(bytes) == [bytes(frames["t1"]![7])])
        #expect(seqs(restarted.publish([event("t1", 9)], now: 502).loops[0].frames) == [9])

        // A bigger history after the restart has nothing older to replay, but numbering continues.
        let bigger = makeHub(historyLimit: 10, epochPrefix: "test-restart2")
        bigger.restore(states, now: 500)
        let r = bigger.subscribe(sub(0, 1), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 7), now: 501)
        #expect(!r.recovered)
        #expect(r.seq == 8)
        _ = bigger.publish([event("t1", 9)], now: 502)
        let r2 = bigger.subscribe(sub(0, 2), to: "t1", resume: ResumePoint(epoch: epochs["t1"]!, since: 8), now: 503)
        #expect(r2.recovered)
        #expect(seqs(r2.frames) == [9])
    }

    @Test("restore skips invalid topic names and topics without events, and respects maxTopics")
    func restoreFilters() {
        let payload = ByteBuffer(string: #"{"seq":1,"topic":"x"}"#)
        let states = [
            TopicState(name: "bad topic", epoch: "e1", seq: 1, history: [payload], newest: payload),
            TopicState(name: "zero", epoch: "e2", seq: 0, history: [], newest: nil),
            TopicState(name: "a", epoch: "e3", seq: 1, history: [payload], newest: payload),
            TopicState(name: "b", epoch: "e4", seq: 1, history: [payload], newest: payload),
            TopicState(name: "c", epoch: "e5", seq: 1, history: [payload], newest: payload),
        ]
        let hub = makeHub(maxTopics: 2)
        hub.restore(states, now: 0)
        #expect(topicNames(hub) == ["b", "c"], "the oldest restored (first in the file) is forgotten first")
    }

    @Test("restored topics keep their order for forgetting")
    func restoredIdleOrder() {
        let (hub, _, _) = populated(historyLimit: 5)
        let restarted = makeHub(historyLimit: 5, maxTopics: 2, epochPrefix: "test-restart")
        restarted.restore(hub.snapshot(), now: 500)
        _ = restarted.publish([event("t3", 1)], now: 501)
        #expect(topicNames(restarted) == ["t1", "t3"], "t2's newest event is older than t1's")
    }

    @Test("after a restore the pattern snapshot is still most recently updated first")
    func restoredPatternOrder() {
        let hub = makeHub()
        let names = (0..<30).map { "task:\($0)" }
        for (index, name) in names.enumerated() { _ = hub.publish([event(name, 1)], now: UInt64(index + 1)) }
        let restarted = makeHub(epochPrefix: "test-restart")
        restarted.restore(hub.snapshot(), now: 1000)
        let answer = restarted.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 1001)
        #expect(answer.frames.map(topic(of:)) == names.reversed().map(Optional.some))
        // And the next snapshot keeps the file's order.
        #expect(restarted.snapshot().map(\.name) == names)
    }

    @Test("StateFile encode/decode round trip")
    func stateFileRoundTrip() throws {
        for limit in [5, 0] {
            let (hub, _, _) = populated(historyLimit: limit)
            let states = hub.snapshot()
            let encoded = StateFile.encode(states)
            let decoded = try StateFile.decode(encoded)
            #expect(decoded == states, "history \(limit)")
            #expect(decoded.map(\.newest) == states.map(\.newest))
            #expect(StateFile.encode(decoded) == encoded)

            // And a hub restored from the decoded file answers as the original would.
            let restarted = makeHub(historyLimit: limit, epochPrefix: "test-restart")
            restarted.restore(decoded, now: 0)
            #expect(restarted.snapshot() == states)
        }
        #expect(try StateFile.decode(StateFile.encode([]) ) == [])
    }

    @Test("StateFile format: header, topic line, payload lines; newest only when history is empty")
    func stateFileFormat() {
        let p1 = ByteBuffer(string: #"{"seq":16,"topic":"task:1","n":1}"#)
        let p2 = ByteBuffer(string: #"{"seq":17,"topic":"task:1","n":2}"#)
        let p3 = ByteBuffer(string: #"{"seq":3,"topic":"task:2"}"#)
        let states = [
            TopicState(name: "task:1", epoch: "k3x9-1", seq: 17, history: [p1, p2], newest: p2),
            TopicState(name: "task:2", epoch: "k3x9-2", seq: 3, history: [], newest: p3),
        ]
        let text = String(buffer: StateFile.encode(states))
        #expect(
            text == """
                {"progress_relay_state":1,"topics":2}
                {"topic":"task:1","epoch":"k3x9-1","seq":17,"history":2,"newest":false}
                {"seq":16,"topic":"task:1","n":1}
                {"seq":17,"topic":"task:1","n":2}
                {"topic":"task:2","epoch":"k3x9-2","seq":3,"history":0,"newest":true}
                {"seq":3,"topic":"task:2"}

                """)
        #expect((try? StateFile.decode(ByteBuffer(string: text))) == states)
    }

    private static let goodFile = """
        {"progress_relay_state":1,"topics":2}
        {"topic":"task:1","epoch":"k3x9-1","seq":17,"history":2,"newest":false}
        {"seq":16,"topic":"task:1","n":1}
        {"seq":17,"topic":"task:1","n":2}
        {"topic":"task:2","epoch":"k3x9-2","seq":3,"history":0,"newest":true}
        {"seq":3,"topic":"task:2"}

        """

    @Test(
        "StateFile.decode of damaged input throws",
        arguments: [
            "",
            "\n",
            "garbage",
            "not json at all\n{\"topic\":\"a\"}\n",
            #"{"progress_relay_state":2,"topics":0}"# + "\n",
            #"{"topics":0}"# + "\n",
            #"{"progress_relay_state":1}"# + "\n",
            #"{"progress_relay_state":1,"topics":x}"# + "\n",
            // header promises two topics, file holds one
            #"{"progress_relay_state":1,"topics":2}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":1,"history":1,"newest":false}"# + "\n"
                + #"{"seq":1,"topic":"a"}"# + "\n",
            // history lines missing
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":3,"history":3,"newest":false}"# + "\n"
                + #"{"seq":2,"topic":"a"}"# + "\n",
            // newest line missing
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":3,"history":0,"newest":true}"# + "\n",
            // more history than events
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":1,"history":2,"newest":false}"# + "\n"
                + #"{"seq":1,"topic":"a"}"# + "\n" + #"{"seq":1,"topic":"a"}"# + "\n",
            // topic line without epoch / with an unquoted epoch / without seq
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","seq":1,"history":0,"newest":false}"# + "\n",
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":e,"seq":1,"history":0,"newest":false}"# + "\n",
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","history":0,"newest":false}"# + "\n",
        ])
    func decodeDamaged(_ text: String) {
        #expect(throws: StateFileError.self) { try StateFile.decode(ByteBuffer(string: text)) }
    }

    @Test("StateFile.decode of a file cut at any line boundary throws")
    func decodeCutAtLineBoundary() {
        let lines = Self.goodFile.split(separator: "\n", omittingEmptySubsequences: false)
        // lines: header, 2 of topic 1 + 2 payloads, topic 2 line + newest, "" (after the last \n)
        for keep in 0..<(lines.count - 2) {
            let cut = lines[0...keep].joined(separator: "\n") + "\n"
            #expect(throws: StateFileError.self, "kept \(keep + 1) lines") {
                try StateFile.decode(ByteBuffer(string: cut))
            }
        }
    }

    // StateFile.decode's own documentation: "any damage fails the whole file, so a half-written
    // state never passes for a whole one".
    @Test("StateFile.decode of a file cut in the middle of its last line throws")
    func decodeCutMidLine() {
        let cut = String(Self.goodFile.dropLast(5))  // `{"seq":3,"topic":"task` with no newline
        #expect(throws: StateFileError.self) { try StateFile.decode(ByteBuffer(string: cut)) }
        // Cut right before the final newline: every byte of content is there, but the file is not whole either.
        let noNewline = String(Self.goodFile.dropLast(1))
        #expect(throws: StateFileError.self) { try StateFile.decode(ByteBuffer(string: noNewline)) }
    }

    // Negative or huge counts in a damaged file must throw, not trap: a trap would kill the relay
    // at start instead of the error StateFileStore.take promises.
    @Test(
        "StateFile.decode of negative or huge counts throws",
        arguments: [
            #"{"progress_relay_state":1,"topics":-1}"# + "\n",
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":1,"history":-1,"newest":false}"# + "\n",
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":-1,"history":0,"newest":false}"# + "\n",
            #"{"progress_relay_state":1,"topics":1}"# + "\n"
                + #"{"topic":"a","epoch":"e","seq":1,"history":9223372036854775807,"newest":false}"# + "\n",
        ])
    func decodeNegativeCounts(text: String) {
        #expect(throws: StateFileError.self) { try StateFile.decode(ByteBuffer(string: text)) }
    }
}
