import Testing

@testable import RelayWatch

@Suite struct ResumeTrackerTests {
    func event(_ topic: String, _ seq: UInt64, _ type: String? = "progress") -> RelayFrame {
        .event(WatchEvent(topic: topic, seq: seq, type: type))
    }

    @Test func firstConnectionSubscribesPlainly() {
        var tracker = ResumeTracker(topics: ["task:1", "task:*", "task:1"])
        #expect(tracker.connectionOpened() == [#"{"op":"subscribe","topic":"task:1"}"#, #"{"op":"subscribe","topic":"task:*"}"#])
    }

    @Test func reconnectResumesWithEpochAndSince() {
        var tracker = ResumeTracker(topics: ["task:1"])
        _ = tracker.connectionOpened()
        #expect(tracker.receive(.subscribed(topic: "task:1", epoch: "e-1", seq: 0, recovered: false)) == .control)
        #expect(tracker.receive(event("task:1", 1)) == .show)
        #expect(tracker.receive(event("task:1", 2)) == .show)
        #expect(tracker.connectionOpened() == [#"{"op":"subscribe","topic":"task:1","epoch":"e-1","since":2}"#])
        #expect(tracker.receive(.subscribed(topic: "task:1", epoch: "e-1", seq: 4, recovered: true)) == .control)
        // an overlap (a replay of what was shown) is dropped; the rest is shown once, in order
        #expect(tracker.receive(event("task:1", 2)) == .duplicate)
        #expect(tracker.receive(event("task:1", 3)) == .show)
        #expect(tracker.receive(event("task:1", 4)) == .show)
        #expect(tracker.receive(event("task:1", 4)) == .duplicate)
    }

    @Test func aNewEpochStartsOver() {
        var tracker = ResumeTracker(topics: ["task:1"])
        _ = tracker.connectionOpened()
        _ = tracker.receive(.subscribed(topic: "task:1", epoch: "e-1", seq: 0, recovered: false))
        for seq in 1...9 { _ = tracker.receive(event("task:1", UInt64(seq))) }
        _ = tracker.connectionOpened()
        // the relay restarted without its state: new epoch, the newest event carried in as seq 1
        _ = tracker.receive(.subscribed(topic: "task:1", epoch: "e-2", seq: 1, recovered: false))
        #expect(tracker.receive(event("task:1", 1)) == .show)
        #expect(tracker.cursors["task:1"] == TopicCursor(epoch: "e-2", seq: 1))
    }

    @Test func patternSnapshotAfterReconnectIsNotShownTwice() {
        var tracker = ResumeTracker(topics: ["task:*"])
        _ = tracker.connectionOpened()
        #expect(tracker.receive(event("task:7", 3)) == .show)
        #expect(tracker.receive(event("task:8", 1)) == .show)
        _ = tracker.connectionOpened()
        #expect(tracker.receive(event("task:7", 3)) == .duplicate)  // the snapshot: seen
        #expect(tracker.receive(event("task:8", 5)) == .show)  // moved on meanwhile
        #expect(tracker.receive(event("task:8", 5)) == .duplicate)
        _ = tracker.connectionOpened()
        #expect(tracker.receive(event("task:7", 1)) == .show)  // numbered anew
    }
}

@Suite struct OutcomeTests {
    @Test func allCompleteIsZero() {
        var outcome = WatchOutcome(exactTopics: ["a", "b"])
        outcome.record(WatchEvent(topic: "a", seq: 1, type: "complete"))
        #expect(outcome.exitStatus == nil)
        outcome.record(WatchEvent(topic: "b", seq: 1, type: "complete", success: true))
        #expect(outcome.exitStatus == 0)
    }

    @Test func anErrorIsOneOnceAllEnded() {
        var outcome = WatchOutcome(exactTopics: ["a", "b"])
        outcome.record(WatchEvent(topic: "a", seq: 1, type: "error"))
        #expect(outcome.exitStatus == nil)
        outcome.record(WatchEvent(topic: "b", seq: 1, type: "complete"))
        #expect(outcome.exitStatus == 1)
        #expect(outcome.failedTopics == ["a"])
    }

    @Test func unsuccessfulCompleteFailsAndProgressReopens() {
        var outcome = WatchOutcome(exactTopics: ["a"])
        outcome.record(WatchEvent(topic: "a", seq: 1, type: "complete", success: false))
        #expect(outcome.exitStatus == 1)
        outcome.record(WatchEvent(topic: "a", seq: 2, type: "progress"))
        #expect(outcome.exitStatus == nil)
    }

    @Test func patternsNeverEnd() {
        var outcome = WatchOutcome(exactTopics: [])
        outcome.record(WatchEvent(topic: "task:1", seq: 1, type: "complete"))
        #expect(outcome.exitStatus == nil)
    }
}

@Suite struct BackoffTests {
    @Test func doublesWithJitterUpToTheCap() {
        var backoff = Backoff(initial: 0.25, maximum: 5)
        #expect(backoff.next(random: 0) == 0.125)
        #expect(backoff.next(random: 0.999_999) > 0.49)
        for _ in 0..<10 { _ = backoff.next(random: 0.5) }
        #expect(backoff.next(random: 1) == 5)
        backoff.reset()
        #expect(backoff.next(random: 1) == 0.25)
    }
}

@Suite struct EndpointTests {
    @Test func urls() throws {
        #expect(try RelayEndpoint(url: "http://127.0.0.1:8765") == RelayEndpoint(host: "127.0.0.1", port: 8765, path: "/ws"))
        #expect(try RelayEndpoint(url: "ws://[::1]:9/relay/") == RelayEndpoint(host: "::1", port: 9, path: "/relay/ws"))
        #expect(try RelayEndpoint(url: "localhost/ws") == RelayEndpoint(host: "localhost", port: 80, path: "/ws"))
        #expect(throws: EndpointError.self) { try RelayEndpoint(url: "https://relay.example.com") }
        #expect(throws: EndpointError.self) { try RelayEndpoint(url: "http://h:99999") }
    }
}
