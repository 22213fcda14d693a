using System.Runtime.InteropServices;

namespace UblkSharp.Interop.Ceph;

/// <summary>
/// The few librados entry points an RBD client needs: a cluster handle, its configuration, the
/// connection and a pool's IO context. Errors are negative errnos, as librados returns them.
/// </summary>
internal static unsafe partial class Rados
{
    private const string Lib = "librados.so.2";

    [LibraryImport(Lib, EntryPoint = "rados_create2", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rados_create2(out nint cluster, string clusterName, string userName, ulong flags);

    [LibraryImport(Lib, EntryPoint = "rados_conf_read_file", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rados_conf_read_file(nint cluster, string? path);

    [LibraryImport(Lib, EntryPoint = "rados_conf_set", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rados_conf_set(nint cluster, string option, string value);

    [LibraryImport(Lib, EntryPoint = "rados_connect")]
    public static partial int rados_connect(nint cluster);

    [LibraryImport(Lib, EntryPoint = "rados_shutdown")]
    public static partial void rados_shutdown(nint cluster);

    [LibraryImport(Lib, EntryPoint = "rados_ioctx_create", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int rados_ioctx_create(nint cluster, string poolName, out nint ioctx);

    [LibraryImport(Lib, EntryPoint = "rados_ioctx_destroy")]
    public static partial void rados_ioctx_destroy(nint ioctx);
}
