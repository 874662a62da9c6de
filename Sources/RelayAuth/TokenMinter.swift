// TokenMinter: HS256 tokens for `progress-relay token` and `--dev`.

import Foundation
import JWTKit

public enum TokenMinter {
    /// A signed HS256 token for `subject`, granting `topics`, valid for `ttl` seconds from `now`.
    public static func hs256(
        secret: [UInt8], subject: String, topics: [String], ttl: TimeInterval, now: Date = Date()
    ) async throws -> String {
        let keys = await JWTKeyCollection().add(hmac: HMACKey.padded(secret, to: 32), digestAlgorithm: .sha256)
        let issued = now.timeIntervalSince1970.rounded(.down)
        let claims = RelayClaims(sub: subject, exp: issued + ttl.rounded(.down), nbf: nil, topics: topics)
        return try await keys.sign(claims)
    }
}
