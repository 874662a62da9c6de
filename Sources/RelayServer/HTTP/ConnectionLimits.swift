// ConnectionLimits: the bounds of the HTTP/WebSocket edge (issue 15), shared by every event
// loop: connections held at once, connections per client address, and which address a
// connection counts against when it comes through a trusted proxy.

#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// What `serve` was told about the HTTP edge.
public struct HTTPEdgeSettings: Sendable {
    /// HTTP and WebSocket connections held at once (`--max-connections`); one more is answered 503.
    public var maxConnections: Int
    /// Connections one client address may hold (`--max-connections-per-ip`).
    public var maxConnectionsPerAddress: Int
    /// Peers whose `X-Forwarded-For`/`Forwarded` is believed (`--trusted-proxy`).
    public var trustedProxies: [IPNetwork]
    /// Time to complete a WebSocket handshake or a plain request (`--handshake-timeout`).
    public var handshakeTimeout: TimeAmount
    /// Idle time allowed between two plain HTTP requests on one connection.
    public var keepAliveIdle: TimeAmount

    /// The default of `--max-connections` when the open files limit is unknown.
    public static let fallbackMaxConnections = 64
    /// `--max-connections-per-ip`.
    public static let defaultMaxConnectionsPerAddress = 256
    /// `--handshake-timeout`.
    public static let defaultHandshakeTimeout: TimeAmount = .seconds(10)

    public init(
        maxConnections: Int = HTTPEdgeSettings.fallbackMaxConnections,
        maxConnectionsPerAddress: Int = HTTPEdgeSettings.defaultMaxConnectionsPerAddress,
        trustedProxies: [IPNetwork] = IPNetwork.loopback,
        handshakeTimeout: TimeAmount = HTTPEdgeSettings.defaultHandshakeTimeout,
        keepAliveIdle: TimeAmount = .seconds(5)
    ) {
        self.maxConnections = maxConnections
        self.maxConnectionsPerAddress = maxConnectionsPerAddress
        self.trustedProxies = trustedProxies
        self.handshakeTimeout = handshakeTimeout
        self.keepAliveIdle = keepAliveIdle
    }

    /// Request line 8 KiB, one header 8 KiB, all headers 32 KiB, 100 headers: nginx's 4 × 8k
    /// buffers are the bound browsers and proxies already live with; NIO's own defaults (80 KiB,
    /// 80 KiB, 65,534 fields) would let every connection hold far more before it is refused.
    /// NIO checks the request target against `maxHeaderFieldSize` and counts it in
    /// `maxHeaderListSize` too, and raises `headerOverflow` for all four.
    static let decoderLimits: NIOHTTPDecoderLimitConfiguration = {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = 8 * 1024
        limits.maxHeaderListSize = 32 * 1024
        limits.maxHeaderFieldCount = 100
        return limits
    }()
}

/// An IP address range (`10.0.0.0/8`, `::1`), as `--trusted-proxy` takes it.
public struct IPNetwork: Sendable, Hashable, CustomStringConvertible {
    /// 4 or 16 bytes, the bits past the prefix cleared.
    let bytes: [UInt8]
    let prefixLength: Int

    /// `ADDRESS` or `ADDRESS/PREFIX`; nil for anything else.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress.bytes(String(parts[0])) else { return nil }
        var length = address.count * 8
        if parts.count == 2 {
            guard let given = Int(parts[1]), parts[1].allSatisfy(\.isNumber), (0...length).contains(given) else {
                return nil
            }
            length = given
        }
        prefixLength = length
        bytes = address.enumerated().map { index, byte in byte & Self.mask(index: index, prefixLength: length) }
    }

    public static let loopback: [IPNetwork] = [IPNetwork("127.0.0.0/8")!, IPNetwork("::1")!]

    func contains(_ address: [UInt8]) -> Bool {
        guard address.count == bytes.count else { return false }
        for index in bytes.indices where address[index] & Self.mask(index: index, prefixLength: prefixLength) != bytes[index] {
            return false
        }
        return true
    }

    private static func mask(index: Int, prefixLength: Int) -> UInt8 {
        let bits = min(8, max(0, prefixLength - index * 8))
        return bits == 0 ? 0 : ~(UInt8(0xFF) >> bits)
    }

    public var description: String {
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family = bytes.count == 4 ? AF_INET : AF_INET6
        _ = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &text, socklen_t(text.count)) }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/\(prefixLength)"
    }
}

enum IPAddress {
    /// 4 bytes for IPv4 (also when written as IPv4-mapped IPv6, as a dual-stack socket reports
    /// IPv4 peers), 16 for IPv6; nil when `text` is not an address.
    static func bytes(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF { return Array(bytes[12...]) }
        return bytes
    }
}

/// What a connection counts against in the per-address budget.
enum ClientKey: Hashable {
    case address([UInt8])
    /// A hop a trusted proxy named without an address (`unknown`, an obfuscated `_name`).
    case label(String)

    /// The address a connection's first request counts against: its peer, or, for a peer inside
    /// a trusted range that forwards, the rightmost hop of the forwarding header outside those
    /// ranges. nil: not limited per address (a trusted peer that forwards nothing is the site's
    /// own proxy or health check; every browser behind it would otherwise share one budget).
    static func of(peer: SocketAddress?, headers: HTTPHeaders, trusted: [IPNetwork]) -> ClientKey? {
        guard let text = peer?.ipAddress, let address = IPAddress.bytes(text) else { return nil }
        guard trusted.contains(where: { $0.contains(address) }) else { return .address(address) }
        // X-Forwarded-For first: what nginx (`$proxy_add_x_forwarded_for`) and HAProxy
        // (`option forwardfor`) append; RFC 7239 `Forwarded` when it is the only one.
        let hops: [Substring]
        let forwardedFor = headers["x-forwarded-for"]
        if !forwardedFor.isEmpty {
            hops = forwardedFor.flatMap { $0.split(separator: ",") }
        } else {
            hops = headers["forwarded"].flatMap(Self.forwardedHops)
        }
        for hop in hops.reversed() {
            let token = hop.trimmingSpaces.strippingQuotes
            guard !token.isEmpty else { continue }
            guard let address = IPAddress.bytes(String(Self.host(of: token))) else {
                return .label(String(token.lowercased().prefix(64)))
            }
            if trusted.contains(where: { $0.contains(address) }) { continue }
            return .address(address)
        }
        return nil
    }

    /// The `for=` values of a `Forwarded` header, in order (RFC 7239 section 4).
    private static func forwardedHops(_ value: String) -> [Substring] {
        value.split(separator: ",").compactMap { element in
            for pair in element.split(separator: ";") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                if parts.count == 2, parts[0].trimmingSpaces.lowercased() == "for" { return parts[1] }
            }
            return nil
        }
    }

    /// `[v6]:port` → `v6`, `v4:port` → `v4`; a bare IPv6 address stays as it is.
    private static func host(of token: Substring) -> Substring {
        if token.hasPrefix("["), let close = token.firstIndex(of: "]") {
            return token[token.index(after: token.startIndex)..<close]
        }
        if token.filter({ $0 == ":" }).count == 1, let colon = token.firstIndex(of: ":") { return token[..<colon] }
        return token
    }
}

extension Substring {
    fileprivate var trimmingSpaces: Substring {
        var text = self
        while let first = text.first, first == " " || first == "\t" { text.removeFirst() }
        while let last = text.last, last == " " || last == "\t" { text.removeLast() }
        return text
    }

    fileprivate var strippingQuotes: Substring {
        count >= 2 && hasPrefix("\"") && hasSuffix("\"") ? dropFirst().dropLast() : self
    }
}

/// The counts behind `--max-connections` and `--max-connections-per-ip`, shared by every loop:
/// the total in an atomic (touched once per accept and close), the per-address map under a
/// lock (touched once per connection, at its first request head, and at its close).
final class ConnectionLimits: Sendable {
    let settings: HTTPEdgeSettings
    private let metrics: RelayMetrics
    private let perAddress = NIOLockedValueBox([ClientKey: Int]())

    init(settings: HTTPEdgeSettings, metrics: RelayMetrics) {
        self.settings = settings
        self.metrics = metrics
    }

    /// A connection was accepted; true when it is one too many (it gets 503 at its request).
    func opened() -> Bool {
        metrics.httpConnected(1) > settings.maxConnections
    }

    func closed() {
        _ = metrics.httpConnected(-1)
    }

    /// Takes one place of `key`'s budget; false when it has none left.
    func acquire(_ key: ClientKey) -> Bool {
        let limit = settings.maxConnectionsPerAddress
        return perAddress.withLockedValue { counts in
            let held = counts[key, default: 0]
            guard held < limit else { return false }
            counts[key] = held + 1
            return true
        }
    }

    func release(_ key: ClientKey) {
        perAddress.withLockedValue { counts in
            guard let held = counts[key] else { return }
            counts[key] = held > 1 ? held - 1 : nil
        }
    }

    func refused(_ refusal: EdgeRefusal) {
        metrics.httpRefused(refusal.metricReason)
    }
}
