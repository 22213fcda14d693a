namespace UblkSharp.Nbd;

/// <summary>
/// One request in flight on a connection: the header fields and, for READ and WRITE, a pooled
/// buffer for the data. The objects are reused; each connection has at most MaxInFlight of them.
/// </summary>
internal sealed class NbdRequest(NbdConnection connection) : INbdWork
{
    public NbdConnection Connection { get; } = connection;

    public ulong Cookie;
    public ushort Type;
    public ushort Flags;
    public long Offset;
    public uint Length;

    /// <summary>READ/WRITE bytes counted against the connection's in-flight limit.</summary>
    public uint Bytes;

    /// <summary>Rented from the shared array pool for READ and WRITE; null otherwise.</summary>
    public byte[]? Buffer;

    public void Execute() => Connection.Execute(this);
}
