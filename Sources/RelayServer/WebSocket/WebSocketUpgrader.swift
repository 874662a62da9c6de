// WebSocketUpgrader: the `GET /ws` handshake.
//
// NIO's own `NIOWebSocketServerUpgrader` always installs a frame encoder that
// takes `WebSocketFrame` values. The relay writes finished frames (built once
// by the hub and shared by every subscriber), so this upgrader installs only
// NIO's frame decoder and the subscriber handler. The handshake itself
// follows RFC 6455 section 4.2.2; no extension is ever negotiated.
//
// Subprotocols: a client may carry its token as `bearer.<JWT>` beside `progress-relay.v1`
// (browsers cannot set `Authorization`, and a URL ends up in proxy logs); the answer selects
// `progress-relay.v1` alone, never the token. A `?ticket=` is taken out of the store here,
// before anything can refuse the handshake, so that a ticket is used once whatever happens.

import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOWebSocket
import RelayAuth

struct WebSocketUpgrader: HTTPServerProtocolUpgrader, Sendable {
    let supportedProtocol = "websocket"
    // Names that must also appear in `Connection`; WebSocket needs none.
    let requiredUpgradeHeaders: [String] = []

    let maxFrameSize: Int
    /// Whether this request may be upgraded at all (path, origin); a refused one goes on to the HTTP handler.
    let accepts: @Sendable (HTTPRequestHead) -> Bool
    /// Takes the request's `?ticket=` out of the store: nil when it has none.
    let redeemTicket: @Sendable (HTTPRequestHead) -> Result<Principal, TokenError>?
    /// Completes the pipeline once the 101 answer went out; frames read meanwhile wait for it.
    /// The third argument is what the request's ticket stood for, when it had one.
    let installSubscriber: @Sendable (Channel, HTTPRequestHead, Result<Principal, TokenError>?) -> EventLoopFuture<Void>
    /// Tickets redeemed by a handshake being answered, until its pipeline is installed.
    let redeemed = RedeemedTickets()

    private static let guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    func buildUpgradeResponse(
        channel: Channel, upgradeRequest: HTTPRequestHead, initialResponseHeaders: HTTPHeaders
    ) -> EventLoopFuture<HTTPHeaders> {
        // A connection over `--max-connections` or its address's budget is answered 503 by the
        // HTTP handler, before its ticket is taken.
        if let edge = try? channel.pipeline.syncOperations.handler(type: HTTPEdgeGuard.self), edge.admit(upgradeRequest) != nil {
            return channel.eventLoop.makeFailedFuture(NIOWebSocketUpgradeError.unsupportedWebSocketTarget)
        }
        let keys = upgradeRequest.headers["sec-websocket-key"]
        let ticket = redeemTicket(upgradeRequest)
        let offered = OfferedSubprotocols(upgradeRequest.headers)
        guard accepts(upgradeRequest), WebSocketHandshake.hasValidKey(upgradeRequest),
            WebSocketHandshake.hasSupportedVersion(upgradeRequest), offered.refusal == nil
        else {
            return channel.eventLoop.makeFailedFuture(NIOWebSocketUpgradeError.unsupportedWebSocketTarget)
        }
        if let ticket { redeemed.put(ticket, for: channel) }
        let digest = Insecure.SHA1.hash(data: Array((keys[0] + Self.guid).utf8))
        var headers = initialResponseHeaders
        headers.replaceOrAdd(name: "Upgrade", value: "websocket")
        headers.replaceOrAdd(name: "Connection", value: "upgrade")
        headers.add(name: "Sec-WebSocket-Accept", value: Data(digest).base64EncodedString())
        if offered.offersRelayProtocol {
            headers.add(name: "Sec-WebSocket-Protocol", value: OfferedSubprotocols.relayProtocol)
        }
        return channel.eventLoop.makeSucceededFuture(headers)
    }

    func upgrade(context: ChannelHandlerContext, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<Void> {
        let channel = context.channel
        do {
            try channel.pipeline.syncOperations.addHandler(
                ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: maxFrameSize)))
        } catch {
            return channel.eventLoop.makeFailedFuture(error)
        }
        return installSubscriber(channel, upgradeRequest, redeemed.take(for: channel))
    }
}

/// What a ticket stood for, kept from the handshake's answer to the installation of its
/// subscriber (two calls of the upgrader, on the channel's loop). An entry leaves at the
/// latest when its channel closes, so a channel's identifier is never reused while it is here.
final class RedeemedTickets: Sendable {
    private let entries = NIOLockedValueBox([ObjectIdentifier: Result<Principal, TokenError>]())

    func put(_ result: Result<Principal, TokenError>, for channel: any Channel) {
        let key = ObjectIdentifier(channel)
        entries.withLockedValue { $0[key] = result }
        channel.closeFuture.whenComplete { [entries] _ in _ = entries.withLockedValue { $0.removeValue(forKey: key) } }
    }

    func take(for channel: any Channel) -> Result<Principal, TokenError>? {
        let key = ObjectIdentifier(channel)
        return entries.withLockedValue { $0.removeValue(forKey: key) }
    }
}

/// RFC 6455 section 4.2.1 checks that NIO leaves to the upgrader: a handshake that fails them is
/// not upgraded, and the HTTP handler answers it (426 naming version 13, or 400).
enum WebSocketHandshake {
    static func asksForUpgrade(_ head: HTTPRequestHead) -> Bool {
        head.headers["upgrade"].contains { value in
            value.split(separator: ",").contains { $0.trimmingCharacters(in: .whitespaces).lowercased() == "websocket" }
        }
    }

    static func hasSupportedVersion(_ head: HTTPRequestHead) -> Bool {
        head.headers["sec-websocket-version"].map { $0.trimmingCharacters(in: .whitespaces) } == ["13"]
    }

    /// One `Sec-WebSocket-Key`, the base64 of exactly 16 bytes (24 characters with padding).
    static func hasValidKey(_ head: HTTPRequestHead) -> Bool {
        let keys = head.headers["sec-websocket-key"]
        guard keys.count == 1 else { return false }
        let key = keys[0].trimmingCharacters(in: .whitespaces)
        return key.utf8.count == 24 && Data(base64Encoded: key)?.count == 16
    }
}
