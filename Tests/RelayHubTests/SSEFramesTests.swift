// SSE forms in fan-out plans: built once per event (shared by every loop and subscriber), only
// when an event stream is among the targets, in the id format each stream needs.

import NIOCore
import Testing

@testable import RelayHub

private func stream(loop: Int, _ serial: UInt64, pattern: Bool = false) -> SubscriberID {
    SubscriberID(
        loop: loop, serial: serial | SubscriberID.eventStreamBit | (pattern ? SubscriberID.patternStreamBit : 0))
}

private func text(_ buffer: ByteBuffer?) -> String? {
    buffer.map { String(decoding: $0.readableBytesView, as: UTF8.self) }
}

private func storage(_ buffer: ByteBuffer?) -> UnsafeRawPointer? {
    buffer?.withUnsafeReadableBytes { UnsafeRawPointer($0.baseAddress) }
}

@Suite struct SSEFramesTests {
    @Test func webSocketOnlyPlansCarryNoStreamForms() {
        let hub = Hub(configuration: HubConfiguration(loopCount: 2), epochPrefix: "e")
        _ = hub.subscribe(SubscriberID(loop: 0, serial: 1), to: "t", resume: nil, now: 0)
        let fanOut = hub.publish([IncomingEvent(topic: "t", object: ByteBuffer(string: #"{"topic":"t"}"#))], now: 1)
        #expect(fanOut.loops[0].frames.count == 1)
        #expect(fanOut.loops[0].streamFrames.isEmpty)
    }

    @Test func oneBufferPerEventForEveryLoopAndFormat() {
        let hub = Hub(configuration: HubConfiguration(loopCount: 3), epochPrefix: "e")
        let first = hub.subscribe(stream(loop: 0, 1), to: "t", resume: nil, now: 0)
        _ = hub.subscribe(stream(loop: 1, 1), to: "t", resume: nil, now: 0)
        _ = hub.subscribe(stream(loop: 1, 2, pattern: true), to: "t*", resume: nil, now: 0)
        _ = hub.subscribe(SubscriberID(loop: 2, serial: 1), to: "t", resume: nil, now: 0)
        let epoch = first.epoch!
        let fanOut = hub.publish(
            [
                IncomingEvent(topic: "t", object: ByteBuffer(string: #"{"topic":"t","a":1}"#)),
                IncomingEvent(topic: "t", object: ByteBuffer(string: "{\"topic\":\"t\",\r\"b\":2}")),
            ], now: 1)
        let zero = fanOut.loops[0].streamFrames, one = fanOut.loops[1].streamFrames
        #expect(zero.count == 2 && one.count == 2)
        #expect(text(zero[0]?.topic) == "id: \(epoch):1\ndata: {\"seq\":1,\"topic\":\"t\",\"a\":1}\n\n")
        #expect(zero[0]?.pattern == nil)
        #expect(text(one[1]?.pattern) == "id: t \(epoch):2\ndata: {\"seq\":2,\"topic\":\"t\", \"b\":2}\n\n")
        // the same storage on both loops: built once
        #expect(storage(zero[0]?.topic) == storage(one[0]?.topic))
        #expect(fanOut.loops[2].streamFrames.isEmpty)
    }

    @Test func replayAndSnapshotForStreams() {
        let hub = Hub(configuration: HubConfiguration(), epochPrefix: "e")
        _ = hub.publish(
            (1...3).map { IncomingEvent(topic: "p:a", object: ByteBuffer(string: "{\"topic\":\"p:a\",\"n\":\($0)}")) },
            now: 0)
        let epoch = hub.position(of: "p:a")!.epoch
        let resumed = hub.subscribe(stream(loop: 0, 1), to: "p:a", resume: ResumePoint(epoch: epoch, since: 1), now: 1)
        #expect(resumed.recovered)
        #expect(resumed.streamFrames.map { text($0)!.split(separator: "\n")[0] } == ["id: \(epoch):2", "id: \(epoch):3"])
        let snapshot = hub.subscribe(stream(loop: 0, 2, pattern: true), to: "p:*", resume: nil, now: 1)
        #expect(snapshot.streamFrames.map { text($0)!.split(separator: "\n")[0] } == ["id: p:a \(epoch):3"])
        let webSocket = hub.subscribe(SubscriberID(loop: 0, serial: 3), to: "p:a", resume: nil, now: 1)
        #expect(webSocket.streamFrames.isEmpty)
    }
}
