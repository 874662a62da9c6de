// RedisEndpoint parsing: every accepted form of `--redis`, and for each kind of
// mistake an error that names the flag, says what is wrong, and never shows
// the password.

import Testing

@testable import RelayCluster

@Suite struct RedisEndpointTests {
    @Test(arguments: [
        ("redis://localhost:6379", RedisEndpoint(address: .tcp(host: "localhost", port: 6379))),
        ("redis://localhost", RedisEndpoint(address: .tcp(host: "localhost", port: 6379))),
        ("redis://127.0.0.1:7000/", RedisEndpoint(address: .tcp(host: "127.0.0.1", port: 7000))),
        ("redis://10.0.0.5:6380/2", RedisEndpoint(address: .tcp(host: "10.0.0.5", port: 6380), database: 2)),
        ("redis://[::1]:6379/1", RedisEndpoint(address: .tcp(host: "::1", port: 6379), database: 1)),
        ("redis://[::1]", RedisEndpoint(address: .tcp(host: "::1", port: 6379))),
        (
            "redis://relay:s3cret@redis.internal:6379/0",
            RedisEndpoint(address: .tcp(host: "redis.internal", port: 6379), username: "relay", password: "s3cret")
        ),
        ("redis://:pw@h:1", RedisEndpoint(address: .tcp(host: "h", port: 1), password: "pw")),
        // A password with @ and : in it, escaped or not (the last @ ends the user information).
        ("redis://u:p%40ss%3Aw@h:2", RedisEndpoint(address: .tcp(host: "h", port: 2), username: "u", password: "p@ss:w")),
        ("redis://u:p@ss:w@h:2", RedisEndpoint(address: .tcp(host: "h", port: 2), username: "u", password: "p@ss:w")),
        ("unix:///run/redis/redis.sock", RedisEndpoint(address: .unixSocket(path: "/run/redis/redis.sock"))),
    ])
    func accepted(url: String, expected: RedisEndpoint) throws {
        #expect(try RedisEndpoint(parsing: url) == expected)
    }

    @Test(arguments: [
        ("http://localhost:6379", "unknown scheme"),
        ("localhost:6379", "unknown scheme"),
        ("", "unknown scheme"),
        ("rediss://h:6379", "TLS"),
        ("redis://", "host is missing"),
        ("redis://:6379", "host is missing"),
        ("redis://h:", "port must be a number"),
        ("redis://h:0", "port must be a number"),
        ("redis://h:65536", "port must be a number"),
        ("redis://h:63a9", "port must be a number"),
        ("redis://h:6379/x", "database after / must be a number"),
        ("redis://h:6379/-1", "database after / must be a number"),
        ("redis://h:6379/1/2", "database after / must be a number"),
        ("redis://h:6379?db=1", "query options"),
        ("redis://::1:6379", "IPv6 address must be in brackets"),
        ("redis://[::1:6379", "missing ]"),
        ("redis://[::1]6379", "expected :port"),
        ("redis://user@h:6379", "needs a password"),
        ("redis://user:@h:6379", "password is empty"),
        ("redis://u:%zz@h", "bad %-escape"),
        ("unix://relative/r.sock", "must be absolute"),
        ("unix://", "must be absolute"),
        ("unix:///", "socket path is empty"),
        ("unix:///" + String(repeating: "a", count: 120), "longer than 107 bytes"),
    ])
    func refused(url: String, reason: String) {
        #expect {
            try RedisEndpoint(parsing: url)
        } throws: { error in
            let text = "\(error)"
            return text.hasPrefix("--redis \"") && text.contains(reason)
                && text.contains("Expected redis://[user:password@]host:port[/db] or unix:///path/redis.sock")
        }
    }

    @Test func errorsAndDescriptionsHideThePassword() throws {
        do {
            _ = try RedisEndpoint(parsing: "redis://relay:hunter2@h:99999")
            Issue.record("accepted a bad port")
        } catch {
            #expect(!error.description.contains("hunter2"))
            #expect(error.description.contains("redis://***@h:99999"))
        }
        let endpoint = try RedisEndpoint(parsing: "redis://relay:hunter2@[::1]:6380/3")
        #expect(endpoint.description == "redis://relay:***@[::1]:6380/3")
        #expect(try RedisEndpoint(parsing: "redis://:pw@h").description == "redis://:***@h:6379")
        #expect(try RedisEndpoint(parsing: "unix:///tmp/r.sock").description == "unix:///tmp/r.sock")
    }

    @Test func runIDFromInfo() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:0123456789abcdef0123456789abcdef01234567\r\ntcp_port:0\r\n"
        #expect(RedisCommandConnection.parseRunID(info: info) == "0123456789abcdef0123456789abcdef01234567")
        #expect(RedisCommandConnection.parseRunID(info: "# Server\r\nredis_version:7.0.15\r\n") == nil)
        #expect(RedisCommandConnection.parseRunID(info: "run_id:\r\n") == nil)
    }
}
