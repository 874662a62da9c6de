// WebOrigin: a browser origin (`scheme://host[:port]`, RFC 6454) and the rule
// `--allow-origin` applies to WebSocket handshakes.
//
// Browsers send an origin with the scheme and host in lower case and without
// the scheme's default port, so both sides are brought to that form before
// they are compared: `--allow-origin https://App.Example.com:443` matches what
// a browser sends. A value with a path (`https://app.example.com/`) never
// matches anything a browser sends and is refused at start, not at the first
// browser.

/// A browser origin in the form browsers send it: scheme and host in lower case, no default port.
public struct WebOrigin: Hashable, Sendable, CustomStringConvertible {
    public let scheme: String
    public let host: String
    public let port: Int?

    /// Parses `scheme://host[:port]`; nil for anything else (a path, a query, user info, no host).
    public init?(_ text: String) {
        guard let separator = text.range(of: "://") else { return nil }
        let scheme = text[..<separator.lowerBound].lowercased()
        guard let first = scheme.first, first.isASCII, first.isLetter,
            scheme.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "+-.".contains($0)) })
        else { return nil }
        let authority = text[separator.upperBound...]
        guard !authority.isEmpty, !authority.contains(where: { "/?#@ \t\\".contains($0) }) else { return nil }

        var host: Substring
        var portText: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { return nil }
            host = authority[...close]
            let rest = authority[authority.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { return nil }
                portText = rest.dropFirst()
            }
        } else if let colon = authority.lastIndex(of: ":") {
            host = authority[..<colon]
            portText = authority[authority.index(after: colon)...]
        } else {
            host = authority
        }
        guard !host.isEmpty,
            host.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-._~%[]:".contains($0)) })
        else { return nil }
        var port: Int?
        if let portText {
            guard !portText.isEmpty, portText.count <= 5, portText.allSatisfy(\.isASCII), let number = Int(portText),
                (1...65535).contains(number)
            else { return nil }
            port = number == Self.defaultPort(scheme) ? nil : number
        }
        self.scheme = scheme
        self.host = host.lowercased()
        self.port = port
    }

    /// `host[:port]`, as a `Host` header names the same server.
    public var authority: String { port.map { "\(host):\($0)" } ?? host }

    public var description: String { "\(scheme)://\(authority)" }

    static func defaultPort(_ scheme: String) -> Int? {
        switch scheme {
        case "http", "ws": return 80
        case "https", "wss": return 443
        default: return nil
        }
    }
}

/// Which browsers may open a WebSocket: those of the listed origins, and always the relay's own
/// (its live page at `/`, whatever name the browser reached it by). Clients without `Origin`
/// are not browsers and are always allowed: the token is what authorises them.
struct OriginPolicy: Sendable {
    let allowed: Set<WebOrigin>

    func allows(origin: String?, host: String?) -> Bool {
        guard !allowed.isEmpty, let origin else { return true }
        guard let parsed = WebOrigin(origin) else { return false }
        if allowed.contains(parsed) { return true }
        return Self.isSameOrigin(parsed, host: host)
    }

    /// The page was served by the server this request reached: `Origin` names the `Host`.
    static func isSameOrigin(_ origin: WebOrigin, host: String?) -> Bool {
        guard let host, let asOrigin = WebOrigin("\(origin.scheme)://\(host)") else { return false }
        return asOrigin == origin
    }
}
