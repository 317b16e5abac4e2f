<?php
/**
 * Plugin Name: wpf-gateway companion
 * Description: Works with wpf-gateway in front of this site. (1) After WP Fusion applies tags
 *              to a contact, asks the gateway to ignore that contact's update/update_tags
 *              webhooks for a minute (the CRM's echo of our own write). (2) When the gateway
 *              changed a user in this site's database (direct mode, [site.store] notify = true),
 *              clears WordPress's user cache and fires WP Fusion's wpf_tags_modified, so
 *              membership and course plugins react.
 *
 * Install as wp-content/mu-plugins/wpf-gateway.php. In wp-config.php:
 * - WPF_GATEWAY_URL: where the site reaches the gateway, when not at its own URL
 *   (e.g. 'http://127.0.0.1:8080').
 * - WPF_GATEWAY_KEY: the site's access key as the gateway knows it; by default WP Fusion's own
 *   access key (Settings → Advanced), which is the one the CRM's webhooks carry.
 */

/** The key both directions use: WPF_GATEWAY_KEY, else WP Fusion's access key. */
function wpf_gateway_key() {
	if ( defined( 'WPF_GATEWAY_KEY' ) ) {
		return (string) WPF_GATEWAY_KEY;
	}
	return function_exists( 'wpf_get_option' ) ? (string) wpf_get_option( 'access_key' ) : '';
}

// (1) Loopback lock: the CRM will echo the tags WP Fusion just applied as a webhook.
add_action(
	'wpf_tags_applied',
	function ( $user_id, $tags ) {
		if ( ! function_exists( 'wp_fusion' ) ) {
			return;
		}
		$contact_id = wp_fusion()->user->get_contact_id( $user_id );
		if ( empty( $contact_id ) ) {
			return;
		}
		$base = defined( 'WPF_GATEWAY_URL' ) ? WPF_GATEWAY_URL : home_url( '/' );
		$url  = add_query_arg(
			array(
				'wpf_action' => 'lock',
				'access_key' => wpf_gateway_key(),
				'contact_id' => $contact_id,
				'ttl'        => 60,
			),
			$base
		);
		wp_remote_post( $url, array( 'timeout' => 2, 'blocking' => false ) );
	},
	10,
	2
);

// (2) The gateway changed a user: POST /?wpf_gateway=user_changed with the header
// X-WPF-Gateway-Key and {"user_id":N,"contact_id":"…","tags":[…]}. Answered early in `init`,
// before themes or the main query run.
add_action(
	'init',
	function () {
		if ( ! isset( $_GET['wpf_gateway'] ) || 'user_changed' !== $_GET['wpf_gateway'] ) {
			return;
		}
		$answer = function ( $status, $body ) {
			status_header( $status );
			header( 'Content-Type: application/json' );
			echo wp_json_encode( $body );
			exit;
		};
		$key   = wpf_gateway_key();
		$given = isset( $_SERVER['HTTP_X_WPF_GATEWAY_KEY'] ) ? (string) $_SERVER['HTTP_X_WPF_GATEWAY_KEY'] : '';
		if ( '' === $key || ! hash_equals( $key, $given ) ) {
			$answer( 403, array( 'ok' => false, 'error' => 'invalid_key' ) );
		}
		if ( 'POST' !== $_SERVER['REQUEST_METHOD'] ) {
			$answer( 405, array( 'ok' => false, 'error' => 'post_only' ) );
		}
		$body    = json_decode( file_get_contents( 'php://input' ), true );
		$user_id = is_array( $body ) && isset( $body['user_id'] ) ? (int) $body['user_id'] : 0;
		// The gateway wrote the database behind WordPress's back: forget what is cached first.
		clean_user_cache( $user_id );
		$user = get_userdata( $user_id );
		if ( ! $user ) {
			$answer( 404, array( 'ok' => false, 'error' => 'no_such_user', 'user_id' => $user_id ) );
		}
		// The tags as stored (WP Fusion's meta key when it runs, else what the gateway sent).
		$tags = defined( 'WPF_TAGS_META_KEY' ) ? get_user_meta( $user_id, WPF_TAGS_META_KEY, true ) : null;
		if ( ! is_array( $tags ) ) {
			$tags = isset( $body['tags'] ) && is_array( $body['tags'] ) ? array_values( $body['tags'] ) : array();
		}
		/** WP Fusion's own action after a user's tags were loaded (WPF_User::set_tags). */
		do_action( 'wpf_tags_modified', $user_id, $tags );
		$answer(
			200,
			array(
				'ok'      => true,
				'user_id' => $user_id,
				'tags'    => $tags,
			)
		);
	},
	0
);
