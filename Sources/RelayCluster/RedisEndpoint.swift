// RedisEndpoint: where the Redis of cluster mode is, parsed from `--redis`.
//
// The flag takes `redis://[user:password@]host:port[/db]` or
// `unix:///path/redis.sock`. It is parsed here, by hand, rather than by
// Foundation's URL, so that every mistake gets an error that names the flag and
// the expected shape, and so that a password never appears in an error or a log
// line (descriptions show it as `***`).

import RelayHub

/// Where to reach Redis, and how to log in: the parsed value of `--redis`.
public struct RedisEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// How to reach the server.
    public enum Address: Sendable, Hashable {
        /// TCP to `host` (a name, an IPv4 address, or an IPv6 address without brackets) and `port`.
        case tcp(host: String, port: Int)
        /// A Unix domain socket at an absolute path.
        case unixSocket(path: String)
    }

    /// The longest Unix socket path the C library accepts (`sun_path` less its terminating NUL).
    public static let maximumSocketPathLength = 107

    /// How to reach the server.
    public var address: Address
    /// The user of `AUTH user password`; nil for `AUTH password` (the `default` user).
    public var username: String?
    /// The password sent with `AUTH`; nil to send no `AUTH`.
    public var password: String?
    /// The database chosen with `SELECT` when not 0.
    public var database: Int

    /// Creates an endpoint from its parts.
    public init(address: Address, username: String? = nil, password: String? = nil, database: Int = 0) {
        self.address = address
        self.username = username
        self.password = password
        self.database = database
    }

    /// Parses the value of `--redis`.
    ///
    /// Accepts `redis://[[user]:password@]host[:port][/db]` (port 6379 when omitted; an IPv6 host
    /// in brackets; `%XX` escapes in the user and password) and `unix:///absolute/path`.
    ///
    /// - Throws: ``RedisEndpointError``, whose description names `--redis`, says what is wrong and
    ///   shows the expected forms; the password is never part of it.
    public init(parsing url: String) throws(RedisEndpointError) {
        func fail(_ reason: String) -> RedisEndpointError {
            RedisEndpointError(url: url, reason: reason)
        }
        if url.hasPrefix("unix://") {
            let path = String(url.dropFirst("unix://".count))
            guard path.hasPrefix("/") else {
                throw fail("the socket path must be absolute, as in unix:///run/redis/redis.sock")
            }
            guard path.count > 1 else { throw fail("the socket path is empty") }
            guard !path.contains("?"), !path.contains("#") else {
                throw fail("options after the socket path are not supported")
            }
            guard path.utf8.count <= Self.maximumSocketPathLength else {
                throw fail("the socket path is longer than \(Self.maximumSocketPathLength) bytes")
            }
            guard !path.utf8.contains(0) else { throw fail("the socket path contains a NUL byte") }
            self.init(address: .unixSocket(path: path))
            return
        }
        guard url.hasPrefix("redis://") else {
            if url.hasPrefix("rediss://") {
                throw fail("TLS (rediss://) is not supported; use redis:// on a trusted network or a Unix socket")
            }
            throw fail("unknown scheme; it must start with redis:// or unix://")
        }
        var rest = Substring(url.dropFirst("redis://".count))
        guard !rest.contains("?"), !rest.contains("#") else {
            throw fail("query options (?...) are not supported; put the database number in the path, as in /2")
        }

        // Path: nothing, "/", or "/<db>".
        var database = 0
        if let slash = rest.firstIndex(of: "/") {
            let path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
            if !path.isEmpty {
                guard path.allSatisfy(\.isASCIIDigit), path.count <= 9, let number = Int(path) else {
                    throw fail("the database after / must be a number, as in redis://localhost:6379/2")
                }
                database = number
            }
        }

        // User information: everything before the last "@".
        var username: String?
        var password: String?
        if let at = rest.lastIndex(of: "@") {
            let userInfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
            guard let colon = userInfo.firstIndex(of: ":") else {
                throw fail("a user name needs a password (user:password@), or give only a password (:password@)")
            }
            let user = userInfo[..<colon]
            guard let decodedUser = PercentDecoding.decode(user),
                let decodedPassword = PercentDecoding.decode(userInfo[userInfo.index(after: colon)...])
            else {
                throw fail("bad %-escape in the user or password")
            }
            guard !decodedPassword.isEmpty else { throw fail("the password is empty") }
            username = decodedUser.isEmpty ? nil : decodedUser
            password = decodedPassword
        }

        // Host and port.
        let host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw fail("missing ] after the IPv6 address") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw fail("expected :port after the IPv6 address") }
                portText = after.dropFirst()
            }
        } else {
            if let colon = rest.firstIndex(of: ":") {
                host = rest[..<colon]
                portText = rest[rest.index(after: colon)...]
            } else {
                host = rest
            }
            guard !host.contains(":") && !(portText?.contains(":") ?? false) else {
                throw fail("an IPv6 address must be in brackets, as in redis://[::1]:6379")
            }
        }
        guard !host.isEmpty else { throw fail("the host is missing") }
        var port = 6379
        if let portText {
            guard !portText.isEmpty, portText.count <= 5, portText.allSatisfy(\.isASCIIDigit),
                let number = Int(portText), (1...65535).contains(number)
            else {
                throw fail("the port must be a number from 1 to 65535")
            }
            port = number
        }
        self.init(address: .tcp(host: String(host), port: port), username: username, password: password, database: database)
    }

    /// The endpoint as a URL, with the password shown as `***`: for logs.
    public var description: String {
        switch self.address {
        case .unixSocket(let path):
            return "unix://" + path + (self.database == 0 ? "" : " (db \(self.database))")
        case .tcp(let host, let port):
            var text = "redis://"
            if self.password != nil {
                text += (self.username ?? "") + ":***@"
            }
            text += host.contains(":") ? "[\(host)]" : host
            text += ":\(port)"
            if self.database != 0 { text += "/\(self.database)" }
            return text
        }
    }
}

/// A `--redis` value that could not be parsed.
public struct RedisEndpointError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was wrong.
    public var reason: String
    /// The value, with any user information replaced by `***@`.
    public var redactedURL: String

    /// Creates the error for `url` (which is redacted here) and `reason`.
    public init(url: String, reason: String) {
        self.reason = reason
        let schemeEnd = url.hasPrefix("redis://") ? url.index(url.startIndex, offsetBy: 8) : nil
        if let schemeEnd, let at = url.lastIndex(of: "@"), at >= schemeEnd {
            self.redactedURL = String(url[..<schemeEnd]) + "***" + String(url[at...])
        } else {
            self.redactedURL = url
        }
    }

    /// A usage-style message: the flag, the value, what is wrong, and the accepted forms.
    public var description: String {
        "--redis \"\(self.redactedURL)\": \(self.reason). Expected redis://[user:password@]host:port[/db] or unix:///path/redis.sock"
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { self >= "0" && self <= "9" }
}
