// WebSocketUpgrader: the `GET /ws` handshake.
//
// NIO's own `NIOWebSocketServerUpgrader` always installs a frame encoder that
// takes `WebSocketFrame` values. The relay writes finished frames (built once
// by the hub and shared by every subscriber), so this upgrader installs only
// NIO's frame decoder and the subscriber handler. The handshake itself
// follows RFC 6455 section 4.2.2; no extension is ever negotiated.

import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket

struct WebSocketUpgrader: HTTPServerProtocolUpgrader, Sendable {
    let supportedProtocol = "websocket"
    // Names that must also appear in `Connection`; WebSocket needs none.
    let requiredUpgradeHeaders: [String] = []

    let maxFrameSize: Int
    /// Whether this request may be upgraded at all (path, origin); a refused one goes on to the HTTP handler.
    let accepts: @Sendable (HTTPRequestHead) -> Bool
    /// Completes the pipeline once the 101 answer went out; frames read meanwhile wait for it.
    let installSubscriber: @Sendable (Channel, HTTPRequestHead) -> EventLoopFuture<Void>

    private static let guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    func buildUpgradeResponse(
        channel: Channel, upgradeRequest: HTTPRequestHead, initialResponseHeaders: HTTPHeaders
    ) -> EventLoopFuture<HTTPHeaders> {
        let keys = upgradeRequest.headers["sec-websocket-key"]
        guard accepts(upgradeRequest), keys.count == 1, upgradeRequest.headers["sec-websocket-version"] == ["13"]
        else {
            return channel.eventLoop.makeFailedFuture(NIOWebSocketUpgradeError.unsupportedWebSocketTarget)
        }
        let digest = Insecure.SHA1.hash(data: Array((keys[0] + Self.guid).utf8))
        var headers = initialResponseHeaders
        headers.replaceOrAdd(name: "Upgrade", value: "websocket")
        headers.replaceOrAdd(name: "Connection", value: "upgrade")
        headers.add(name: "Sec-WebSocket-Accept", value: Data(digest).base64EncodedString())
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
        return installSubscriber(channel, upgradeRequest)
    }
}
