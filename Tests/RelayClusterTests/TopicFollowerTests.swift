// Tests of TopicFollower, the per-topic follow logic of cluster mode, with no Redis: the tests
// play the subscription connection and the script's `read`, feed the follower, and check the
// actions it returns. The randomized test is the issue's core property: whatever the connection
// drops, repeats or reorders, and whatever Redis forgets, the hub is told every event once and in
// order, and every loss is announced by a reset, never skipped silently.

import NIOCore
import RelayHub
import Testing

@testable import RelayCluster

// MARK: - Helpers

private func line(_ epoch: String, _ seq: UInt64) -> ByteBuffer {
    ByteBuffer(string: "{\"e\":\"\(epoch)\",\"n\":\(seq)}")
}

private func msg(_ epoch: String, _ seq: UInt64) -> RelayMessagePayload {
    RelayMessagePayload(seq: seq, epoch: epoch, line: line(epoch, seq))
}

/// A read's reply: newest `seq` in `epoch`, history from `from` (nil: empty).
private func history(_ epoch: String, _ seq: UInt64, from: UInt64? = nil) -> TopicHistory {
    let entries = from.map { from in
        (from...max(from, seq)).filter { $0 <= seq }.map { HistoryEntry(seq: Int64($0), line: line(epoch, $0)) }
    } ?? []
    return TopicHistory(seq: Int64(seq), epoch: epoch, entries: entries)
}

/// Actions as short strings, so that a test states what it expects in one line.
/// `.repaired` is left out: it only reports the `.publish` after it (tested on its own).
private func show(_ actions: [TopicFollower.Action]) -> [String] {
    actions.compactMap { action -> String? in
        switch action {
        case .subscribe(let topic): return "sub \(topic)"
        case .unsubscribe(let topic): return "unsub \(topic)"
        case .read(let topic, let count, _): return "read \(topic) \(count)"
        case .reset(let topic, let epoch, let newest, let events):
            return "reset \(topic) \(epoch)/\(newest) [\(events.map { "\($0.seq)" }.joined(separator: ","))]"
        case .publish(let topic, let events):
            let epochs = Set(events.map(\.epoch)).sorted().joined(separator: "+")
            for event in events { #expect(event.object == line(event.epoch, event.seq)) }
            return "pub \(topic) \(epochs):\(events.map { "\($0.seq)" }.joined(separator: ","))"
        case .answer(let topic, let waiter): return "answer \(topic) \(waiter)"
        case .overflowed(let topic, let dropped): return "overflow \(topic) \(dropped)"
        case .repaired: return nil
        }
    }
}

/// The token of the last read in `actions`.
private func token(_ actions: [TopicFollower.Action]) -> TopicFollower.ReadToken {
    for action in actions.reversed() {
        if case .read(_, _, let token) = action { return token }
    }
    Issue.record("no read in \(show(actions))")
    return TopicFollower.ReadToken(value: 0)
}

/// A follower with topic `t` joined at E/`seq` (history from 1), no read outstanding.
private func live(at seq: UInt64 = 5, epoch: String = "E", holdLimit: Int = 16) -> TopicFollower {
    var follower = TopicFollower(configuration: .init(historyCount: 10, holdLimit: holdLimit))
    _ = follower.join("t")
    let read = follower.subscribed("t")
    _ = follower.readCompleted("t", token: token(read), history: history(epoch, seq, from: seq == 0 ? nil : 1))
    return follower
}

// MARK: - Join

@Suite struct TopicFollowerJoinTests {
    @Test func joinSubscribesThenReadsThenResets() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        #expect(show(follower.join("t")) == ["sub t"])
        #expect(show(follower.join("t")).isEmpty)  // held already
        let read = follower.subscribed("t")
        #expect(show(read) == ["read t 10"])
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 3, from: 1)))
            == ["reset t E/3 [1,2,3]"])
        #expect(follower.position(of: "t") == TopicPosition(epoch: "E", seq: 3))
        #expect(show(follower.message("t", msg("E", 4))) == ["pub t E:4"])
    }

    @Test func messagesBeforeConfirmationAreCoveredByTheRead() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        #expect(show(follower.message("t", msg("E", 1))).isEmpty)
        let read = follower.subscribed("t")
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 1, from: 1)))
            == ["reset t E/1 [1]"])
    }

    @Test func messagesDuringTheReadAreMergedBySeq() {
        // Before the read ran (3, 4: in its reply), after it (5, 6), duplicated and out of order.
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let read = follower.subscribed("t")
        for seq: UInt64 in [3, 4, 5, 4, 6, 5] {
            #expect(show(follower.message("t", msg("E", seq))).isEmpty)
        }
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 4, from: 1)))
            == ["reset t E/4 [1,2,3,4]", "pub t E:5,6"])
        // After the read: a duplicate is dropped, the next is delivered.
        #expect(show(follower.message("t", msg("E", 6))).isEmpty)
        #expect(show(follower.message("t", msg("E", 7))) == ["pub t E:7"])
    }

    @Test func aHoleAmongTheHeldMessagesIsReadNeverDelivered() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let read = follower.subscribed("t")
        _ = follower.message("t", msg("E", 5))
        _ = follower.message("t", msg("E", 7))  // 6 was lost
        _ = follower.message("t", msg("E", 8))
        let actions = follower.readCompleted("t", token: token(read), history: history("E", 4, from: 1))
        #expect(show(actions) == ["reset t E/4 [1,2,3,4]", "pub t E:5", "read t 10"])
        #expect(show(follower.readCompleted("t", token: token(actions), history: history("E", 8, from: 1)))
            == ["pub t E:6,7,8"])
    }

    @Test func anEmptyTopicJoinsAtSeqZero() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let read = follower.subscribed("t")
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 0))) == ["reset t E/0 []"])
        #expect(show(follower.message("t", msg("E", 1))) == ["pub t E:1"])
    }

    @Test func aStaleReplyIsIgnored() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let first = follower.subscribed("t")
        let second = follower.resubscribed()
        #expect(show(follower.readCompleted("t", token: token(first), history: history("E", 2, from: 1))).isEmpty)
        #expect(show(follower.readCompleted("t", token: token(second), history: history("E", 2, from: 1)))
            == ["reset t E/2 [1,2]"])
    }

    @Test func aFailedReadIsIssuedAgain() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let read = follower.subscribed("t")
        let again = follower.readFailed("t", token: token(read))
        #expect(show(again) == ["read t 10"])
        #expect(token(again) != token(read))
    }
}

// MARK: - Live

@Suite struct TopicFollowerLiveTests {
    @Test func deliverDropHold() {
        var follower = live(at: 5)
        #expect(show(follower.message("t", msg("E", 6))) == ["pub t E:6"])
        #expect(show(follower.message("t", msg("E", 6))).isEmpty)
        #expect(show(follower.message("t", msg("E", 2))).isEmpty)
        #expect(show(follower.message("t", msg("E", 9))) == ["read t 10"])
        #expect(show(follower.message("t", msg("E", 10))).isEmpty)  // held
        #expect(follower.position(of: "t") == TopicPosition(epoch: "E", seq: 6))
        #expect(show(follower.message("other", msg("E", 1))).isEmpty)  // not held
    }

    @Test func repairPublishesTheMissingThenTheHeldInOneBatch() {
        var follower = live(at: 5)
        let read = follower.message("t", msg("E", 8))
        _ = follower.message("t", msg("E", 10))
        _ = follower.message("t", msg("E", 9))
        _ = follower.message("t", msg("E", 10))
        let actions = follower.readCompleted("t", token: token(read), history: history("E", 9, from: 1))
        #expect(show(actions) == ["pub t E:6,7,8,9,10"])
        // Reported first, counting the events the read filled in (6...9), not the held one.
        guard case .repaired("t", 4) = actions.first else {
            Issue.record("expected .repaired(t, 4) first, got \(actions)")
            return
        }
        #expect(follower.position(of: "t") == TopicPosition(epoch: "E", seq: 10))
    }

    @Test func repairBeyondHistoryResets() {
        var follower = live(at: 5)
        let read = follower.message("t", msg("E", 30))
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 30, from: 21)))
            == ["reset t E/30 [21,22,23,24,25,26,27,28,29,30]"])
        #expect(show(follower.message("t", msg("E", 31))) == ["pub t E:31"])
    }

    @Test func historyReachingExactlyTheFirstMissingRepairs() {
        var follower = live(at: 5)
        let read = follower.message("t", msg("E", 15))
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 15, from: 6)))
            == ["pub t E:6,7,8,9,10,11,12,13,14,15"])
    }

    @Test func anotherEpochReadsThenResets() {
        var follower = live(at: 5)
        let read = follower.message("t", msg("F", 1))
        #expect(show(read) == ["read t 10"])
        _ = follower.message("t", msg("F", 2))
        #expect(show(follower.readCompleted("t", token: token(read), history: history("F", 1, from: 1)))
            == ["reset t F/1 [1]", "pub t F:2"])
        // A late message of the old epoch reads once more, and the reply changes nothing.
        let stale = follower.message("t", msg("E", 6))
        #expect(show(stale) == ["read t 10"])
        #expect(show(follower.readCompleted("t", token: token(stale), history: history("F", 2, from: 1))).isEmpty)
    }

    @Test func aReadThatFindsNothingNewChangesNothing() {
        var follower = live(at: 5)
        let read = follower.resubscribed()
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 5, from: 1))).isEmpty)
    }

    @Test func brokenHistoryFromRedisIsNotTrustedForARepair() {
        var follower = live(at: 5)
        let read = follower.message("t", msg("E", 9))
        // Entries 6, 8, 9: only the run ending at the newest (8, 9) counts, which misses 6 and 7.
        let reply = TopicHistory(
            seq: 9, epoch: "E",
            entries: [6, 8, 9].map { HistoryEntry(seq: $0, line: line("E", UInt64($0))) })
        #expect(show(follower.readCompleted("t", token: token(read), history: reply)) == ["reset t E/9 [8,9]"])
    }

    @Test func holdOverflowDropsAndReadsAgain() {
        var follower = live(at: 5, holdLimit: 3)
        let read = follower.message("t", msg("E", 7))
        for seq: UInt64 in 8...10 { #expect(show(follower.message("t", msg("E", seq))).isEmpty) }
        #expect(show(follower.message("t", msg("E", 11))) == ["overflow t 4"])
        #expect(show(follower.message("t", msg("E", 12))).isEmpty)  // dropped, covered by the next read
        let actions = follower.readCompleted("t", token: token(read), history: history("E", 8, from: 1))
        #expect(show(actions) == ["pub t E:6,7,8", "read t 10"])
        #expect(show(follower.readCompleted("t", token: token(actions), history: history("E", 12, from: 1)))
            == ["pub t E:9,10,11,12"])
    }

    @Test func resubscribeReadsAndRepairsEveryTopic() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        for topic in ["a", "b", "c"] {
            _ = follower.join(topic)
            let read = follower.subscribed(topic)
            _ = follower.readCompleted(topic, token: token(read), history: history("E", 3, from: 1))
        }
        let reads = follower.resubscribed()
        #expect(show(reads) == ["read a 10", "read b 10", "read c 10"])
        var tokens: [String: TopicFollower.ReadToken] = [:]
        for case .read(let topic, _, let token) in reads { tokens[topic] = token }
        #expect(show(follower.readCompleted("a", token: tokens["a"]!, history: history("E", 3, from: 1))).isEmpty)
        #expect(show(follower.readCompleted("b", token: tokens["b"]!, history: history("E", 5, from: 1)))
            == ["pub b E:4,5"])
        #expect(show(follower.readCompleted("c", token: tokens["c"]!, history: history("G", 1, from: 1)))
            == ["reset c G/1 [1]"])
    }

    @Test func resubscribeConfirmsATopicStillBeingSubscribed() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        let reads = follower.resubscribed()
        #expect(show(reads) == ["read t 10"])
        #expect(show(follower.subscribed("t")).isEmpty)  // a late confirmation does not read twice
        #expect(show(follower.readCompleted("t", token: token(reads), history: history("E", 2, from: 1)))
            == ["reset t E/2 [1,2]"])
    }
}

// MARK: - Linger and waiting subscribes

@Suite struct TopicFollowerLingerTests {
    @Test func lingerThenUnsubscribe() {
        var follower = live(at: 5)
        #expect(show(follower.leave("t", now: 1_000)).isEmpty)
        #expect(show(follower.tick(now: 1_000 + 29_999_999_999)).isEmpty)
        #expect(show(follower.message("t", msg("E", 6))) == ["pub t E:6"])  // still followed
        #expect(show(follower.tick(now: 1_000 + 30_000_000_000)) == ["unsub t"])
        #expect(follower.topicCount == 0)
        #expect(show(follower.message("t", msg("E", 7))).isEmpty)
        #expect(show(follower.join("t")) == ["sub t"])
    }

    @Test func aJoinDuringTheLingerCancelsIt() {
        var follower = live(at: 5)
        _ = follower.leave("t", now: 0)
        #expect(show(follower.join("t")).isEmpty)
        #expect(show(follower.tick(now: 60_000_000_000)).isEmpty)
        #expect(follower.topicCount == 1)
    }

    @Test func aWaiterIsAnsweredWhenTheRingCatchesUp() {
        var follower = live(at: 5)
        #expect(show(follower.waitFor("t", waiter: 1, epoch: "E", seq: 7, now: 0)).isEmpty)
        #expect(show(follower.waitFor("t", waiter: 2, epoch: "E", seq: 5, now: 0)) == ["answer t 2"])
        #expect(show(follower.message("t", msg("E", 6))) == ["pub t E:6"])
        #expect(show(follower.message("t", msg("E", 7))) == ["pub t E:7", "answer t 1"])
    }

    @Test func aWaiterReadsAfterItsDeadlineAndIsAnsweredFromTheRead() {
        var follower = live(at: 5)
        _ = follower.waitFor("t", waiter: 1, epoch: "E", seq: 7, now: 0)
        #expect(show(follower.tick(now: 1_999_999_999)).isEmpty)
        let read = follower.tick(now: 2_000_000_000)
        #expect(show(read) == ["read t 10"])
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 7, from: 1)))
            == ["pub t E:6,7", "answer t 1"])
    }

    @Test func aWaiterOfAJoiningTopicIsAnsweredAfterTheJoin() {
        var follower = TopicFollower(configuration: .init(historyCount: 10))
        _ = follower.join("t")
        _ = follower.waitFor("t", waiter: 1, epoch: "E", seq: 3, now: 0)
        let read = follower.subscribed("t")
        #expect(show(follower.readCompleted("t", token: token(read), history: history("E", 3, from: 1)))
            == ["reset t E/3 [1,2,3]", "answer t 1"])
    }
}

// MARK: - Randomized: drops, duplicates, reorders, blips, lost data

/// A deterministic generator (SplitMix64), so that a failure names its seed.
private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Plays Redis: per topic an epoch, a newest seq and a history of `historyLimit` (the script's).
private struct FakeRedis {
    struct Stored {
        var epoch: String
        var seq: UInt64 = 0
        var history: [UInt64] = []
    }

    let historyLimit: Int
    var topics: [String: Stored] = [:]
    var epochSerial = 0

    mutating func touch(_ topic: String) -> Stored {
        if let stored = topics[topic] { return stored }
        epochSerial += 1
        let stored = Stored(epoch: "E\(epochSerial)")
        topics[topic] = stored
        return stored
    }

    mutating func publish(_ topic: String) -> RelayMessagePayload {
        var stored = touch(topic)
        stored.seq += 1
        stored.history.append(stored.seq)
        if stored.history.count > historyLimit { stored.history.removeFirst() }
        topics[topic] = stored
        reached[stored.epoch] = stored.seq
        return msg(stored.epoch, stored.seq)
    }

    mutating func read(_ topic: String, count: Int) -> TopicHistory {
        let stored = touch(topic)
        let seqs = stored.history.suffix(count)
        return TopicHistory(
            seq: Int64(stored.seq), epoch: stored.epoch,
            entries: seqs.map { HistoryEntry(seq: Int64($0), line: line(stored.epoch, $0)) })
    }

    /// The topic's state is lost (expiry, restart without data); or a restart carries its newest as seq 1.
    mutating func newEpoch(_ topic: String, carry: Bool) {
        let carried = carry && topics[topic].map { $0.seq > 0 } ?? false
        topics[topic] = nil
        var stored = touch(topic)
        if carried {
            stored.seq = 1
            stored.history = [1]
            topics[topic] = stored
            reached[stored.epoch] = 1
        }
    }

    /// Every event that ever existed: (epoch, seq) is valid when seq ≤ the newest its epoch reached.
    var reached: [String: UInt64] = [:]
}

/// Plays the hub: applies the follower's actions with the hub's own checks, and checks each event
/// against what Redis numbered.
private struct ModelHub {
    var positions: [String: TopicPosition] = [:]
    var published = 0
    var joins = 0
    var announcedResets = 0
    /// The newest seq each epoch ever reached in the fake Redis (epochs are never reused).
    var reached: [String: UInt64] = [:]

    mutating func apply(_ action: TopicFollower.Action, seed: UInt64) {
        switch action {
        case .publish(let topic, let events):
            for event in events {
                let current = positions[topic]
                #expect(current != nil, "seed \(seed): publish to \(topic) before its join")
                #expect(event.topic == topic)
                #expect(event.epoch == current?.epoch, "seed \(seed): \(topic) other epoch \(event.epoch) at \(current!)")
                #expect(event.seq == (current?.seq ?? 0) + 1, "seed \(seed): \(topic) seq \(event.seq) at \(current!)")
                #expect(event.seq <= reached[event.epoch] ?? 0, "seed \(seed): an event Redis never numbered")
                #expect(event.object == line(event.epoch, event.seq))
                positions[topic] = TopicPosition(epoch: event.epoch, seq: event.seq)
                published += 1
            }
        case .reset(let topic, let epoch, let newest, let events):
            if let current = positions[topic] {
                #expect(current.epoch != epoch || newest >= current.seq, "seed \(seed): rewind of \(topic)")
                announcedResets += 1
            } else {
                joins += 1
            }
            #expect(newest <= reached[epoch] ?? 0)
            for (index, event) in events.enumerated() {
                #expect(event.seq == newest - UInt64(events.count - 1 - index))
                #expect(event.object == line(epoch, event.seq))
            }
            positions[topic] = TopicPosition(epoch: epoch, seq: newest)
        case .unsubscribe(let topic):
            positions[topic] = nil
        case .subscribe, .read, .answer, .overflowed, .repaired:
            break
        }
    }
}

/// What travels on the subscription connection, in order.
private enum Delivery {
    case message(String, RelayMessagePayload)
    case confirmation(String)
}

/// One run: random traffic over `topicNames`, delivered with drops, duplicates, reorders and
/// blips; Redis sometimes forgets a topic. At the end everything is delivered, the connection
/// comes back once more, and every held topic must stand exactly where Redis does.
private func randomRun(
    seed: UInt64, steps: Int, history: Int, holdLimit: Int, lossy: Bool
) -> (hub: ModelHub, lastPublished: Int) {
    var random = SplitMix(state: seed)
    var redis = FakeRedis(historyLimit: history)
    var hub = ModelHub()
    var follower = TopicFollower(configuration: .init(historyCount: history, holdLimit: holdLimit))
    let topicNames = ["a", "b", "c", "d"]
    var subscribed = Set<String>()  // channels Redis delivers to this relay
    var wire: [Delivery] = []  // the subscription connection, in flight
    var pendingReads: [(String, Int, TopicFollower.ReadToken)] = []  // sent, not run yet
    var replies: [(String, TopicFollower.ReadToken, TopicHistory)] = []  // run, reply in flight
    var joined = Set<String>()
    var now: UInt64 = 0
    let window = 4

    func carry(_ actions: [TopicFollower.Action]) {
        for action in actions {
            hub.reached = redis.reached
            hub.apply(action, seed: seed)
            switch action {
            case .subscribe(let topic):
                subscribed.insert(topic)
                wire.append(.confirmation(topic))
            case .unsubscribe(let topic):
                subscribed.remove(topic)
            case .read(let topic, let count, let token):
                pendingReads.append((topic, count, token))
            default:
                break
            }
        }
    }

    func deliver(_ item: Delivery) {
        switch item {
        case .message(let topic, let payload): carry(follower.message(topic, payload))
        case .confirmation(let topic): carry(follower.subscribed(topic))
        }
    }

    func runRead() {
        let (topic, count, token) = pendingReads.removeFirst()
        replies.append((topic, token, redis.read(topic, count: count)))
    }

    func replyRead() {
        let (topic, token, history) = replies.removeFirst()
        carry(follower.readCompleted(topic, token: token, history: history))
    }

    for _ in 0..<steps {
        now += UInt64.random(in: 0...200_000_000, using: &random)
        carry(follower.tick(now: now))
        let roll = Int.random(in: 0..<1000, using: &random)
        switch roll {
        case 0..<300:  // publish
            let topic = topicNames.randomElement(using: &random)!
            let payload = redis.publish(topic)
            if subscribed.contains(topic) { wire.append(.message(topic, payload)) }
        case 300..<620:  // deliver, maybe out of order, maybe lost, maybe twice
            guard !wire.isEmpty else { break }
            // Messages may overtake messages only, within the window (a confirmation keeps its place).
            var reach = 0
            while reach < min(window, wire.count), case .message = wire[reach] { reach += 1 }
            let index = reach == 0 ? 0 : Int.random(in: 0..<reach, using: &random)
            let item = wire.remove(at: index)
            let fate = Int.random(in: 0..<100, using: &random)
            if case .message = item, lossy, fate < 3 { break }  // lost
            deliver(item)
            if case .message = item, fate >= 95 { deliver(item) }  // twice
        case 620..<720:
            if !pendingReads.isEmpty { runRead() }
        case 720..<820:
            if !replies.isEmpty { replyRead() }
        case 820..<870:  // a first local subscriber
            let topic = topicNames.randomElement(using: &random)!
            if joined.insert(topic).inserted { carry(follower.join(topic)) }
        case 870..<890:  // the last local subscriber leaves
            if let topic = joined.randomElement(using: &random) {
                joined.remove(topic)
                carry(follower.leave(topic, now: now))
            }
        case 890..<900 where lossy:  // subscription connection blip: in flight lost, resubscribed
            wire.removeAll()
            carry(follower.resubscribed())
        case 900..<905 where lossy:  // command connection blip: reads lost
            let lost = pendingReads.map { ($0.0, $0.2) } + replies.map { ($0.0, $0.1) }
            pendingReads.removeAll()
            replies.removeAll()
            for (topic, token) in lost { carry(follower.readFailed(topic, token: token)) }
        case 905..<908 where lossy:  // Redis forgets a topic (expiry, restart)
            redis.newEpoch(topicNames.randomElement(using: &random)!, carry: Bool.random(using: &random))
        default:
            break
        }
    }

    // Quiet: deliver and run everything, then a last reconnection, which must leave every held
    // topic where Redis stands.
    func drain() {
        while !wire.isEmpty || !pendingReads.isEmpty || !replies.isEmpty {
            if !wire.isEmpty {
                deliver(wire.removeFirst())
            } else if !pendingReads.isEmpty {
                runRead()
            } else {
                replyRead()
            }
        }
    }
    drain()
    let lastPublished = hub.published
    carry(follower.resubscribed())
    drain()
    for topic in subscribed {
        let stored = redis.touch(topic)
        #expect(
            hub.positions[topic] == TopicPosition(epoch: stored.epoch, seq: stored.seq),
            "seed \(seed): \(topic) at \(hub.positions[topic].map(\.description) ?? "nothing"), Redis at \(stored.epoch)/\(stored.seq)")
        #expect(follower.position(of: topic) == hub.positions[topic])
    }
    return (hub, lastPublished)
}

@Suite struct TopicFollowerRandomizedTests {
    @Test(arguments: 0..<40)
    func lossyStreamsAreDeliveredOnceInOrderWithEveryLossAnnounced(seed: UInt64) {
        // Small history and hold limit, so that resets and overflows happen too.
        let (hub, _) = randomRun(seed: seed, steps: 4000, history: 6, holdLimit: 5, lossy: true)
        #expect(hub.published > 0)
    }

    @Test(arguments: 100..<120)
    func withoutLossNothingIsReset(seed: UInt64) {
        // Duplicates and reorders only, history long enough: only joins reset, and the last
        // reconnection finds nothing to repair.
        let (hub, lastPublished) = randomRun(seed: seed, steps: 4000, history: 10_000, holdLimit: 5, lossy: false)
        #expect(hub.announcedResets == 0, "seed \(seed)")
        #expect(hub.published == lastPublished, "seed \(seed)")
        #expect(hub.published > 100)
    }
}
