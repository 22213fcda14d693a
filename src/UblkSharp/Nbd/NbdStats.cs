using UblkSharp.Runtime.Metrics;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Nbd;

/// <summary>
/// An NBD server's figures at one moment (<see cref="NbdServer.Stats"/>): its connections, each
/// export's requests summed over its live and closed connections (so they never go down), and each
/// live connection's own requests. Request figures are those a ublk device keeps
/// (<see cref="QueueStatsSnapshot"/>; its Queue is -1): TRIM counts as discard, CACHE and
/// BLOCK_STATUS as other; requests refused before reaching the target count with their error.
/// </summary>
/// <param name="Address">Where the server listens.</param>
/// <param name="TakenAtUnixMs">When the figures were taken.</param>
/// <param name="OpenConnections">Connections open now, in their handshake or past it.</param>
/// <param name="Accepted">Connections accepted since the start, refused ones included.</param>
/// <param name="Closed">Connections served and closed since the start.</param>
/// <param name="Refused">Connections closed at once because the most allowed were open.</param>
/// <param name="Exports">Each export's figures, in the server's order.</param>
/// <param name="Connections">Each live connection past its handshake, oldest first.</param>
public sealed record NbdServerStats(string Address, long TakenAtUnixMs, int OpenConnections, long Accepted, long Closed, long Refused,
    IReadOnlyList<NbdExportStats> Exports, IReadOnlyList<NbdConnectionStats> Connections);

/// <summary>One export's figures: <paramref name="Connections"/> past their handshake on it now, and the requests of all it ever had.</summary>
public sealed record NbdExportStats(string Name, int Connections, QueueStatsSnapshot Total);

/// <summary>One live connection past its handshake: its id (as in the server's log), its peer, its export and its requests.</summary>
public sealed record NbdConnectionStats(long Id, string Peer, string Export, QueueStatsSnapshot Figures);

internal static class NbdStatOps
{
    /// <summary>The operation an NBD command counts as.</summary>
    public static StatOp Of(ushort type) => type switch
    {
        CmdRead => StatOp.Read,
        CmdWrite => StatOp.Write,
        CmdFlush => StatOp.Flush,
        CmdTrim => StatOp.Discard,
        CmdWriteZeroes => StatOp.WriteZeroes,
        _ => StatOp.Other, // CACHE, BLOCK_STATUS, and unknown commands refused
    };
}
