<?php
// WordPress from Debian's package on a test database, for the wpf-gateway tests
// (tests/it/wp_php.rs) and bench/wordpress.sh, which fill in the %NAME% placeholders.
// `php wp.php ACTION ARGS...` answers one question in JSON; under `php -S` it is the router
// that loads WordPress for each request (mu-plugins answer them).
define( 'DB_NAME', '%DB%' );
define( 'DB_USER', 'root' );
define( 'DB_PASSWORD', '' );
define( 'DB_HOST', '127.0.0.1:%PORT%' );
define( 'DB_CHARSET', 'utf8mb4' );
define( 'DB_COLLATE', '' );
define( 'WP_HOME', '%HOME%' );
define( 'WP_SITEURL', '%HOME%' );
define( 'WPMU_PLUGIN_DIR', '%DIR%/mu-plugins' );
define( 'WP_HTTP_BLOCK_EXTERNAL', true );
define( 'DISABLE_WP_CRON', true );
define( 'WP_DEBUG', false );
foreach ( %CONSTANTS% as $name => $value ) {
	define( $name, $value );
}
$table_prefix = 'wp_';
if ( PHP_SAPI === 'cli' ) {
	$_SERVER['HTTP_HOST']   = parse_url( WP_HOME, PHP_URL_HOST );
	$_SERVER['REQUEST_URI'] = '/';
}
// WordPress's files use globals of their own (`$action` among them): ours are constants.
define( 'WPFGW_ARGS', PHP_SAPI === 'cli' ? array_slice( $argv, 1 ) : array( 'serve' ) );
$action = WPFGW_ARGS[0];
if ( 'install' === $action ) {
	define( 'WP_INSTALLING', true );
	function wp_new_blog_notification() {}
}
define( 'ABSPATH', '%WORDPRESS%/' );
require ABSPATH . 'wp-settings.php';
$action = WPFGW_ARGS[0];
$args   = WPFGW_ARGS;
if ( 'serve' === $action ) {
	return;
}
$slug = '%SLUG%';
function answer( $value ) {
	echo json_encode( $value );
	exit( 0 );
}
switch ( $action ) {
	case 'install':
		require_once ABSPATH . 'wp-admin/includes/upgrade.php';
		$r = wp_install( 'Test site', 'admin', 'admin@example.test', false, '', 'admin-pass-1' );
		answer( array( 'user_id' => $r['user_id'] ) );
	case 'user':
		$u = get_user_by( 'email', $args[1] );
		if ( ! $u ) {
			answer( null );
		}
		$data = get_userdata( $u->ID );
		answer( array(
			'id'           => $u->ID,
			'login'        => $u->user_login,
			'nicename'     => $u->user_nicename,
			'email'        => $u->user_email,
			'display_name' => $u->display_name,
			'roles'        => array_values( $data->roles ),
			'level'        => (int) $data->user_level,
			'tags'         => get_user_meta( $u->ID, "{$slug}_tags", true ),
			'contact_id'   => get_user_meta( $u->ID, "{$slug}_contact_id", true ),
			'first_name'   => get_user_meta( $u->ID, 'first_name', true ),
			'users'        => (int) count_users()['total_users'],
		) );
	case 'check_password':
		$u = get_user_by( 'email', $args[1] );
		answer( wp_check_password( $args[2], $u->user_pass, $u->ID ) );
	case 'insert_user':
		$id = wp_insert_user( array(
			'user_login' => $args[1],
			'user_email' => $args[2],
			'user_pass'  => $args[3],
			'role'       => 'subscriber',
		) );
		answer( is_wp_error( $id ) ? $id->get_error_message() : $id );
	case 'seed':
		// `seed COUNT TAG...`: users bench-1 ... bench-COUNT, linked to contacts 1 ... COUNT
		// and tagged TAG..., made by wp_insert_user in one transaction.
		$GLOBALS['wpdb']->query( 'START TRANSACTION' );
		for ( $i = 1; $i <= (int) $args[1]; $i++ ) {
			$id = wp_insert_user( array(
				'user_login' => "bench-$i",
				'user_email' => "bench-$i@example.test",
				'user_pass'  => wp_generate_password( 16 ),
				'role'       => 'subscriber',
			) );
			if ( is_wp_error( $id ) ) {
				fwrite( STDERR, $id->get_error_message() . "\n" );
				exit( 1 );
			}
			update_user_meta( $id, "{$slug}_contact_id", (string) $i );
			update_user_meta( $id, "{$slug}_tags", array_slice( $args, 2 ) );
		}
		$GLOBALS['wpdb']->query( 'COMMIT' );
		answer( (int) count_users()['total_users'] );
	case 'sanitize':
		$out = array();
		foreach ( array_slice( $args, 1 ) as $name ) {
			$login = sanitize_user( $name, true );
			$out[] = array( $login, sanitize_title( $login ) );
		}
		answer( $out );
}
fwrite( STDERR, "unknown action $action\n" );
exit( 2 );
