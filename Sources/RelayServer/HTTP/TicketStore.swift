// TicketStore: one-time WebSocket tickets (`POST /ticket`, then `GET /ws?ticket=`).
//
// A ticket stands for a token verified when it was issued: the WebSocket URL then carries
// 128 random bits that are worthless after one use or 30 seconds, instead of the token, which
// proxies would write to their access logs. The store is shared by every HTTP loop, so it is a
// lock-protected Sendable type; it holds at most `capacity` tickets, and issuing one more drops
// the oldest. Tickets expire in issue order (they all live as long), so the oldest are also the
// first to expire: one queue in issue order serves both the bound and the expiry.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import RelayAuth

final class TicketStore: Sendable {
    static let defaultLifetimeSeconds: Int64 = 30
    static let defaultCapacity = 10_000

    struct Entry: Sendable {
        let principal: Principal
        /// The `Origin` of the POST that asked for it: the WebSocket handshake must carry the same.
        let origin: String?
        let expires: NIODeadline
    }

    private struct State {
        var entries: [String: Entry] = [:]
        /// Tickets in issue order, redeemed ones included until they reach the front.
        var order = CircularBuffer<String>()
    }

    let capacity: Int
    let lifetimeSeconds: Int64
    private let state = NIOLockedValueBox(State())

    init(capacity: Int = TicketStore.defaultCapacity, lifetimeSeconds: Int64 = TicketStore.defaultLifetimeSeconds) {
        self.capacity = max(1, capacity)
        self.lifetimeSeconds = max(1, lifetimeSeconds)
    }

    /// Outstanding tickets (issued, not redeemed, perhaps expired but not yet swept).
    var count: Int { state.withLockedValue { $0.entries.count } }

    /// A new ticket for `principal`, bound to `origin` when the request carried one.
    func issue(for principal: Principal, origin: String?, now: NIODeadline = .now()) -> String {
        let ticket = Self.randomTicket()
        let entry = Entry(principal: principal, origin: origin, expires: now + .seconds(lifetimeSeconds))
        let capacity = self.capacity
        state.withLockedValue { state in
            // Sweep the front: tickets already redeemed, or expired.
            while let first = state.order.first {
                if let entry = state.entries[first], entry.expires > now { break }
                state.entries[first] = nil
                state.order.removeFirst()
            }
            // The bound: the oldest outstanding ticket goes.
            while state.entries.count >= capacity, let first = state.order.popFirst() {
                state.entries[first] = nil
            }
            // Redeemed tickets behind a live one stay in the queue until it moves; never let
            // them make it much longer than the bound.
            if state.order.count >= 2 * capacity {
                state.order = CircularBuffer(state.order.filter { state.entries[$0] != nil })
            }
            state.entries[ticket] = entry
            state.order.append(ticket)
        }
        return ticket
    }

    /// Takes `ticket` out of the store, whatever comes of it: a ticket is used once, even by a
    /// handshake that fails. The principal when it is valid, unexpired, and asked for from the
    /// origin it was issued to.
    func redeem(
        _ ticket: String, origin: String?, now: NIODeadline = .now(), wallClock: Double = Date().timeIntervalSince1970
    ) -> Result<Principal, TokenError> {
        let entry = state.withLockedValue { $0.entries.removeValue(forKey: ticket) }
        guard let entry else { return .failure(.badTicket("unknown or already used ticket")) }
        guard entry.expires > now else { return .failure(.badTicket("ticket expired")) }
        // The token it stands for may have expired meanwhile: the connection would end at once.
        if let exp = entry.principal.expiresAt, wallClock >= Double(exp) { return .failure(.expired) }
        if let bound = entry.origin, !Self.sameOrigin(bound, origin) {
            return .failure(.badTicket("ticket issued to another origin"))
        }
        return .success(entry.principal)
    }

    static func sameOrigin(_ bound: String, _ presented: String?) -> Bool {
        guard let presented else { return false }
        if let a = WebOrigin(bound), let b = WebOrigin(presented) { return a == b }
        return bound == presented
    }

    /// 128 bits from the system's generator (getrandom), base64url without padding: 22 characters.
    static func randomTicket() -> String {
        var generator = SystemRandomNumberGenerator()
        var bytes = [UInt8]()
        bytes.reserveCapacity(16)
        for _ in 0..<2 {
            let word = generator.next() as UInt64
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return base64URL(bytes)
    }

    static func base64URL(_ bytes: [UInt8]) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
        var out = [UInt8]()
        var index = 0
        while index < bytes.count {
            let chunk = bytes[index..<min(index + 3, bytes.count)]
            var value = UInt32(0)
            for (offset, byte) in chunk.enumerated() { value |= UInt32(byte) << UInt32(16 - 8 * offset) }
            let characters = chunk.count + 1
            for position in 0..<characters {
                out.append(alphabet[Int((value >> UInt32(18 - 6 * position)) & 0x3f)])
            }
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// The subprotocols of a WebSocket handshake (`Sec-WebSocket-Protocol`): a client may carry its
/// token as `bearer.<JWT>` beside `progress-relay.v1`, the one name the relay selects.
struct OfferedSubprotocols {
    static let relayProtocol = "progress-relay.v1"
    static let bearerPrefix = "bearer."

    let names: [String]

    init(_ headers: HTTPHeaders) {
        names = headers[canonicalForm: "sec-websocket-protocol"].map { String($0) }.filter { !$0.isEmpty }
    }

    var offersRelayProtocol: Bool { names.contains(Self.relayProtocol) }

    var bearerTokens: [String] {
        names.filter { $0.hasPrefix(Self.bearerPrefix) }.map { String($0.dropFirst(Self.bearerPrefix.count)) }
    }

    /// Why the handshake cannot be taken, if it cannot: a bearer token needs `progress-relay.v1`
    /// beside it (the relay must select a name the client offered, and never echoes the token).
    var refusal: String? {
        let bearers = bearerTokens
        if bearers.isEmpty { return nil }
        if bearers.count > 1 { return "more than one bearer.<token> subprotocol" }
        if !offersRelayProtocol { return "a bearer.<token> subprotocol must be offered with \(Self.relayProtocol)" }
        return nil
    }
}
