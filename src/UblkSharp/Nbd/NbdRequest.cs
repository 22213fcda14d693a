namespace UblkSharp.Nbd;

/// <summary>
/// One request in flight on a connection: the header fields and, for READ and WRITE, a buffer for
/// the data. The objects are reused (a connection has at most MaxInFlight of them), and each keeps
/// its own buffer for requests up to <see cref="OwnedLimit"/>, so steady-state traffic allocates
/// nothing; larger payloads borrow from the shared array pool.
/// </summary>
internal sealed class NbdRequest(NbdConnection connection) : INbdWork
{
    public const int OwnedLimit = 256 * 1024;

    private byte[]? _owned;

    public NbdConnection Connection { get; } = connection;

    public ulong Cookie;
    public ushort Type;
    public ushort Flags;
    public long Offset;
    public uint Length;

    /// <summary>When its header was read (<see cref="System.Diagnostics.Stopwatch.GetTimestamp"/>), for its latency.</summary>
    public long Started;

    /// <summary>READ/WRITE bytes counted against the connection's in-flight limit.</summary>
    public uint Bytes;

    /// <summary>The data buffer while the request is in flight (see <see cref="TakeBuffer"/>); null otherwise.</summary>
    public byte[]? Buffer;

    /// <summary>Sets <see cref="Buffer"/> to at least <paramref name="length"/> bytes.</summary>
    public byte[] TakeBuffer(int length)
    {
        if (length > OwnedLimit)
        {
            return Buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(length);
        }
        if (_owned is null || _owned.Length < length)
        {
            if (_owned is not null)
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(_owned);
            }
            // Kept for the connection's life, then given back for the next connection.
            _owned = System.Buffers.ArrayPool<byte>.Shared.Rent(Math.Max(length, 4096));
        }
        return Buffer = _owned;
    }

    /// <summary>Gives the kept buffer back to the shared pool (the connection is closing).</summary>
    public void ReleaseOwned()
    {
        if (_owned is not null)
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(_owned);
            _owned = null;
        }
    }

    public void ReturnBuffer()
    {
        if (Buffer is not null && !ReferenceEquals(Buffer, _owned))
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(Buffer);
        }
        Buffer = null;
    }

    public void Execute() => Connection.Execute(this);
}
