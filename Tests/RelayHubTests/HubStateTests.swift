// Tests of the Hub's snapshot and restore, and of the state file (`StateFile`) that carries them
// across a restart: round trips, the format, and damaged files that must throw.

import NIOCore
import Testing

@testable import RelayHub

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
