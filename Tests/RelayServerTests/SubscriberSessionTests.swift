// SubscriberSession, the subscription rules as a state machine, driven by a manual clock: token
// expiry and refresh, the refresh rate, the heartbeat, the operation rate, subscriptions and
// their bounds, and that nothing follows a close.

import Foundation
import NIOCore
import RelayAuth
import Testing

@testable import RelayHub
@testable import RelayServer

@Suite struct SubscriberSessionTests {
    typealias Action = SubscriberSession.Action

    /// Monotonic and wall clocks that share nothing, as on a real host.
    private static let start = SubscriberSession.Clock(
        monotonic: .uptimeNanoseconds(5_000_000_000), wall: 1_700_000_000)
    private static let limits = SubscriberSession.Limits(
        maxSubscriptions: 3, maxPatternSubscriptions: 1, pingInterval: .seconds(25))

    private static func principal(
        _ subject: String = "alice", grants: [String] = ["task:*"], until: Double? = 1_700_000_060
    ) -> Principal {
        Principal(subject: subject, grants: GrantSet(grants), expiresAt: until.map { Int64($0) }, validUntil: until)
    }

    private static func later(_ amount: TimeAmount, wallStep: Double = 0) -> SubscriberSession.Clock {
        SubscriberSession.Clock(
            monotonic: start.monotonic + amount, wall: start.wall + Double(amount.nanoseconds) / 1e9 + wallStep)
    }

    /// An open session with `principal`, subscribed to `topics`.
    private static func open(_ principal: Principal = principal(), topics: [String] = []) -> SubscriberSession {
        var session = SubscriberSession(limits: limits, now: start.monotonic)
        let actions = session.start(authentication: .success(principal), urlTopics: topics, clock: start)
        #expect(actions == topics.map { .subscribe(topic: $0, resume: nil) })
        return session
    }

    private static func text(_ string: String) -> ClientInput { .text(ByteBuffer(string: string)) }

    private static func closeCode(_ actions: [Action]) -> CloseCode? {
        for case .close(let code, _) in actions { return code }
        return nil
    }

    // MARK: Start

    @Test func aRefusedTokenGetsAnErrorFrameAnd4401() {
        var session = SubscriberSession(limits: Self.limits, now: Self.start.monotonic)
        let actions = session.start(authentication: .failure(.expired), urlTopics: ["task:1"], clock: Self.start)
        #expect(Self.closeCode(actions) == .unauthorized)
        #expect(actions.contains(.send(ControlFrame.error(.unauthorized, TokenError.expired.description))))
        #expect(!actions.contains { if case .subscribe = $0 { true } else { false } })
        #expect(session.isClosing)
    }

    @Test(arguments: ["other:1", "task:bad topic"]) func aURLTopicNotGrantedOrMalformedIs4403(topic: String) {
        var session = SubscriberSession(limits: Self.limits, now: Self.start.monotonic)
        let actions = session.start(
            authentication: .success(Self.principal()), urlTopics: ["task:1", topic], clock: Self.start)
        #expect(Self.closeCode(actions) == .forbidden)
        #expect(actions.contains(.send(ControlFrame.error(.forbidden, "topic not granted", topic: topic))))
        #expect(session.subscriptions.isEmpty)
    }

    // MARK: Token expiry and refresh

    @Test func theTokenEndsAtItsExpOnTheMonotonicClock() {
        var session = Self.open()
        #expect(session.tick(now: Self.later(.seconds(59)).monotonic, sendPing: false, deadAfter: .seconds(50)) == [])
        let actions = session.tick(now: Self.later(.seconds(60)).monotonic, sendPing: false, deadAfter: .seconds(50))
        #expect(Self.closeCode(actions) == .unauthorized)
        #expect(actions.contains(.send(ControlFrame.error(.unauthorized, "token expired"))))
        #expect(actions.first == .report(.authFailure(reason: "expired", message: "token expired")))
    }

    @Test func aTokenWithoutExpNeverEnds() {
        var session = Self.open(Self.principal(until: nil))
        #expect(
            session.tick(now: Self.later(.hours(24 * 365)).monotonic, sendPing: false, deadAfter: .seconds(50)) == [])
    }

    @Test func aRefreshMovesTheEndAndExpiryWaitsForItsVerdict() {
        var session = Self.open()
        let asked = Self.later(.seconds(50))
        #expect(
            session.read(Self.text(#"{"op":"refresh","token":"t2"}"#), now: asked.monotonic) == [.verify(token: "t2")])
        // The verdict is late: the old end passes meanwhile, and the session waits.
        #expect(session.tick(now: Self.later(.seconds(61)).monotonic, sendPing: false, deadAfter: .seconds(50)) == [])
        let verdict = Self.later(.seconds(62))
        let fresh = Self.principal(until: Self.start.wall + 3600)
        #expect(
            session.refreshed(.success(fresh), clock: verdict) == [.send(ControlFrame.refreshed(exp: fresh.expiresAt))])
        #expect(session.tick(now: Self.later(.seconds(3599)).monotonic, sendPing: false, deadAfter: .seconds(50)) == [])
        #expect(
            Self.closeCode(
                session.tick(now: Self.later(.seconds(3600)).monotonic, sendPing: false, deadAfter: .seconds(50)))
                == .unauthorized)
    }

    @Test func aWallClockStepDoesNotMoveTheEnd() {
        var session = Self.open()
        // The wall clock jumped an hour ahead when the refresh was verified: the new token's end
        // is counted from the wall clock then, and timed on the monotonic clock from there.
        _ = session.read(Self.text(#"{"op":"refresh","token":"t2"}"#), now: Self.later(.seconds(20)).monotonic)
        let stepped = Self.later(.seconds(20), wallStep: 3600)
        let fresh = Self.principal(until: stepped.wall + 100)
        _ = session.refreshed(.success(fresh), clock: stepped)
        #expect(session.tick(now: Self.later(.seconds(119)).monotonic, sendPing: false, deadAfter: .seconds(50)) == [])
        #expect(
            Self.closeCode(
                session.tick(now: Self.later(.seconds(120)).monotonic, sendPing: false, deadAfter: .seconds(50)))
                == .unauthorized)
    }

    @Test func atMostOneRefreshPerTenSeconds() {
        var session = Self.open()
        let first = Self.later(.seconds(1)).monotonic
        #expect(session.read(Self.text(#"{"op":"refresh","token":"a"}"#), now: first) == [.verify(token: "a")])
        #expect(
            session.read(Self.text(#"{"op":"refresh","token":"b"}"#), now: first + .milliseconds(9999))
                == [.send(ControlFrame.error(.badRequest, "at most one refresh per 10 s"))])
        #expect(
            session.read(Self.text(#"{"op":"refresh","token":"c"}"#), now: first + .seconds(10)) == [
                .verify(token: "c")
            ])
    }

    @Test func aRefreshForAnotherSubOrABadTokenIs4401() {
        for verdict: Result<Principal, TokenError> in [.success(Self.principal("mallory")), .failure(.badSignature)] {
            var session = Self.open()
            _ = session.read(Self.text(#"{"op":"refresh","token":"t"}"#), now: Self.later(.seconds(1)).monotonic)
            let actions = session.refreshed(verdict, clock: Self.later(.seconds(2)))
            #expect(Self.closeCode(actions) == .unauthorized)
        }
    }

    @Test func aRefreshThatNarrowsTheGrantsEndsTheTopicsItNoLongerCovers() {
        var session = Self.open(topics: ["task:2", "task:1", "task:3"])
        _ = session.read(Self.text(#"{"op":"refresh","token":"t"}"#), now: Self.later(.seconds(1)).monotonic)
        let fresh = Self.principal(grants: ["task:2"], until: Self.start.wall + 600)
        #expect(
            session.refreshed(.success(fresh), clock: Self.later(.seconds(2))) == [
                .send(ControlFrame.refreshed(exp: fresh.expiresAt)),
                .unsubscribe(topic: "task:1", reason: "forbidden"), .unsubscribe(topic: "task:3", reason: "forbidden"),
            ])
        #expect(session.subscriptions == ["task:2"])
        #expect(
            session.unsubscribed(from: "task:1", reason: "forbidden") == [
                .send(ControlFrame.unsubscribed(topic: "task:1", reason: "forbidden"))
            ])
    }

    // MARK: Heartbeat

    @Test func aClientHeardWithinTwoIntervalsIsPingedAndOneThatWasNotIsDropped() {
        var session = Self.open(Self.principal(until: nil))
        let deadAfter = TimeAmount.seconds(50)
        #expect(session.tick(now: Self.later(.seconds(25)).monotonic, sendPing: true, deadAfter: deadAfter) == [.ping])
        #expect(session.tick(now: Self.later(.seconds(26)).monotonic, sendPing: false, deadAfter: deadAfter) == [])
        session.heard(now: Self.later(.seconds(40)).monotonic)
        #expect(session.tick(now: Self.later(.seconds(90)).monotonic, sendPing: true, deadAfter: deadAfter) == [.ping])
        #expect(
            session.tick(
                now: Self.later(.seconds(90) + .nanoseconds(1)).monotonic, sendPing: true, deadAfter: deadAfter)
                == [.report(.unresponsive), .drop])
        #expect(session.isClosing)
    }

    // MARK: Operation rate

    @Test func theOperationRateCountsMessagesPingsAndPongsTogether() {
        var session = Self.open(Self.principal(until: nil))
        let now = Self.later(.seconds(1)).monotonic
        for index in 0..<OperationRate.burst {
            let input: ClientInput = [Self.text("ping"), .ping(payload: ByteBuffer()), .pong][index % 3]
            #expect(Self.closeCode(session.read(input, now: now)) == nil)
        }
        let actions = session.read(.pong, now: now)
        #expect(Self.closeCode(actions) == .policyViolation)
        #expect(actions.first == .report(.overRate))
        #expect(session.read(Self.text("ping"), now: now + .seconds(10)) == [])
    }

    @Test func onlyTheNewestPingOfABatchIsAnswered() {
        var session = Self.open()
        let now = Self.later(.seconds(1)).monotonic
        _ = session.read(.ping(payload: ByteBuffer(string: "a")), now: now)
        _ = session.read(.ping(payload: ByteBuffer(string: "b")), now: now)
        #expect(session.readComplete() == [.send(ControlFrame.pong(payload: ByteBuffer(string: "b")))])
        #expect(session.readComplete() == [])
    }

    // MARK: Subscriptions

    @Test func subscriptionsAreBoundedPerConnectionAndPatternsApart() {
        var session = Self.open(Self.principal(grants: ["task:*", "*"]))
        let now = Self.later(.seconds(1)).monotonic
        func subscribe(_ topic: String) -> [Action] {
            session.read(Self.text(#"{"op":"subscribe","topic":"\#(topic)"}"#), now: now)
        }
        #expect(subscribe("task:*") == [.subscribe(topic: "task:*", resume: nil)])
        #expect(
            subscribe("task:a*") == [
                .send(ControlFrame.error(.tooManySubscriptions, "at most 1 pattern subscriptions", topic: "task:a*"))
            ])
        #expect(subscribe("task:1") == [.subscribe(topic: "task:1", resume: nil)])
        #expect(subscribe("task:1") == [.subscribe(topic: "task:1", resume: nil)])  // again: not a new one
        #expect(subscribe("task:2") == [.subscribe(topic: "task:2", resume: nil)])
        #expect(
            subscribe("task:3") == [
                .send(ControlFrame.error(.tooManySubscriptions, "at most 3 subscriptions", topic: "task:3"))
            ])
        #expect(
            subscribe("other") == [
                .send(ControlFrame.error(.tooManySubscriptions, "at most 3 subscriptions", topic: "other"))
            ])
    }

    @Test func aTopicNotGrantedOrMalformedIsAnsweredAndTheConnectionStays() {
        var session = Self.open()
        let now = Self.later(.seconds(1)).monotonic
        #expect(
            session.read(Self.text(#"{"op":"subscribe","topic":"other"}"#), now: now)
                == [.send(ControlFrame.error(.forbidden, "topic not granted", topic: "other"))])
        #expect(
            session.read(Self.text(#"{"op":"subscribe","topic":"task:a b"}"#), now: now)
                == [.send(ControlFrame.error(.badRequest, "invalid topic", topic: "task:a b"))])
        #expect(!session.isClosing)
    }

    @Test func onlyTheFirstSubscribedFrameCarriesThePingInterval() {
        var session = Self.open(topics: ["task:1", "task:2"])
        let answer = Subscription(epoch: "e", seq: 3, recovered: false, frames: [ByteBuffer(string: "replay")])
        #expect(
            session.subscribed(to: "task:1", answer) == [
                .answerSubscription(
                    ControlFrame.subscribed(topic: "task:1", subscription: answer, pingInterval: "25"),
                    replay: [ByteBuffer(string: "replay")])
            ])
        #expect(
            session.subscribed(to: "task:2", answer) == [
                .answerSubscription(
                    ControlFrame.subscribed(topic: "task:2", subscription: answer),
                    replay: [ByteBuffer(string: "replay")])
            ])
        // An answer for a topic given up meanwhile is not sent.
        _ = session.read(Self.text(#"{"op":"unsubscribe","topic":"task:2"}"#), now: Self.later(.seconds(1)).monotonic)
        #expect(session.subscribed(to: "task:2", answer) == [])
    }

    @Test func aPatternTheRelayCannotHoldIsReleasedAndAnswered() {
        var session = Self.open(topics: ["task:*"])
        var refused = Subscription(epoch: nil, seq: 0, recovered: false, frames: [])
        refused.refused = true
        #expect(
            session.subscribed(to: "task:*", refused) == [
                .release(["task:*"]),
                .send(
                    ControlFrame.error(
                        .tooManySubscriptions, "the relay holds all the pattern subscriptions it may",
                        topic: "task:*")),
            ])
        #expect(session.subscriptions.isEmpty)
    }

    @Test func nothingFollowsAClose() {
        var session = Self.open(topics: ["task:1"])
        let now = Self.later(.seconds(1)).monotonic
        _ = session.read(.ping(payload: ByteBuffer(string: "x")), now: now)
        #expect(session.read(.close(.normal, reason: ""), now: now) == [.close(.normal, reason: "")])
        #expect(session.readComplete() == [])
        #expect(session.read(Self.text("ping"), now: now) == [])
        #expect(session.subscribed(to: "task:1", Subscription(epoch: "e", seq: 0, recovered: false, frames: [])) == [])
        #expect(session.tick(now: Self.later(.hours(2)).monotonic, sendPing: true, deadAfter: .seconds(50)) == [])
        #expect(session.shutDown(.goingAway) == [])
        #expect(session.fail(.tryAgainLater, reason: "too slow") == [])
        // What the hub holds is still known, so that the connection's end releases it.
        #expect(session.subscriptions == ["task:1"])
    }

    @Test func badClientMessagesAreAnsweredAndTheConnectionStays() {
        var session = Self.open()
        let now = Self.later(.seconds(1)).monotonic
        #expect(session.read(Self.text("nope"), now: now) == [.send(ControlFrame.error(.badRequest, "not JSON"))])
        #expect(
            session.read(Self.text(#"{"op":"dance"}"#), now: now) == [
                .send(ControlFrame.error(.unknownOp, "unknown op dance"))
            ])
        #expect(session.read(Self.text(#"{"op":"ping"}"#), now: now) == [.send(ControlFrame.pong)])
        #expect(!session.isClosing)
    }
}
