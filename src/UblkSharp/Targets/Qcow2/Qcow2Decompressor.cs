using System.IO.Compression;
using ZstdSharp.Unsafe;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// Decompresses one compressed cluster at a time into <see cref="Output"/>, as qemu's
/// qcow2-threads.c does: zlib clusters are raw deflate (no zlib header) and zstd clusters one
/// or more zstd frames. Either way the input may carry trailing bytes (the rest of its last
/// sector, even the next cluster's data), so decompression stops once a whole cluster came out,
/// and a stream that ends before that is an error. Not thread-safe: its image holds a lock.
/// </summary>
internal sealed unsafe class Qcow2Decompressor : IDisposable
{
    // A zstd frame of a qcow2 cluster needs a window no larger than the cluster (qemu compresses
    // each cluster as one frame of known size). A frame asking for more is refused rather than
    // allowed to make the decoder allocate up to zstd's default limit of 128 MiB.
    private const int ZstdWindowLogMax = 22;

    private readonly int _type;
    private ZSTD_DCtx_s* _zstd;

    public Qcow2Decompressor(int compressionType, int clusterSize)
    {
        _type = compressionType;
        // A descriptor counts up to 2^(cluster_bits - 8) sectors of 512 bytes: two clusters.
        Input = new byte[2 * clusterSize];
        Output = new byte[clusterSize];
    }

    /// <summary>Room for the compressed bytes of one cluster.</summary>
    public byte[] Input { get; }

    /// <summary>The last cluster decompressed.</summary>
    public byte[] Output { get; }

    /// <summary>Whether <see cref="Output"/> holds a whole cluster (its owner keeps which one).</summary>
    public bool HasCluster { get; set; }

    /// <summary>Decompresses the first <paramref name="length"/> bytes of <see cref="Input"/> into a whole cluster; false for a bad stream.</summary>
    public bool Decompress(int length)
    {
        try
        {
            return _type == 1 ? Zstd(length) : Deflate(length);
        }
        catch (InvalidDataException)
        {
            return false;
        }
    }

    private bool Deflate(int length)
    {
        // DeflateStream cannot be reset, so each cluster costs one (the decompressor's native state
        // with it) and a stream over the input; reads of uncompressed clusters never come here.
        using var input = new MemoryStream(Input, 0, length, writable: false);
        using var inflater = new DeflateStream(input, CompressionMode.Decompress);
        return inflater.ReadAtLeast(Output, Output.Length, throwOnEndOfStream: false) == Output.Length;
    }

    private bool Zstd(int length)
    {
        if (_zstd == null)
        {
            _zstd = Methods.ZSTD_createDCtx();
            if (_zstd == null || IsError(Methods.ZSTD_DCtx_setParameter(_zstd, ZSTD_dParameter.ZSTD_d_windowLogMax, ZstdWindowLogMax)))
            {
                return false;
            }
        }
        if (IsError(Methods.ZSTD_DCtx_reset(_zstd, ZSTD_ResetDirective.ZSTD_reset_session_only)))
        {
            return false;
        }
        fixed (byte* src = Input)
        fixed (byte* dst = Output)
        {
            var input = new ZSTD_inBuffer_s { src = src, size = (nuint)length, pos = 0 };
            var output = new ZSTD_outBuffer_s { dst = dst, size = (nuint)Output.Length, pos = 0 };
            // As qemu: a cluster may span several frames; stop when it is whole, fail when no progress is made.
            while (output.pos < output.size)
            {
                var lastIn = input.pos;
                var lastOut = output.pos;
                var r = Methods.ZSTD_decompressStream(_zstd, &output, &input);
                if (IsError(r))
                {
                    return false;
                }
                if (output.pos == output.size)
                {
                    break;
                }
                if (input.pos == lastIn && output.pos == lastOut)
                {
                    return false;
                }
            }
            return true;
        }
    }

    // zstd returns errors as the negated error code, near the top of size_t's range.
    private static bool IsError(nuint r) => r > unchecked((nuint)(-(nint)ZSTD_ErrorCode.ZSTD_error_maxCode));

    public void Dispose()
    {
        if (_zstd != null)
        {
            _ = Methods.ZSTD_freeDCtx(_zstd);
            _zstd = null;
        }
    }
}
